"""ul2x.partitioning: the device mesh, logical-axis rules and shardings."""

from ul2x.partitioning.expert_parallel import ExpertParallelPlan, expert_parallel_plan
from ul2x.partitioning.mesh import (MeshError, create_mesh, initialize_distributed,
                                   mesh_platform, mesh_shape_for)
from ul2x.partitioning.rules import (MESH_AXES, logical_to_spec, mesh_axes,
                                     standard_logical_axis_rules)
from ul2x.partitioning.shardings import (axis_rules, batch_spec, constrain, current_axis_rules,
                                         current_split, logical_axes, opt_state_specs,
                                         param_specs, to_named)
