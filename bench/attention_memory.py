"""Memory per device of a model's train step (gin_configs/models/small.gin) with the
reference attention against the flash kernels, by length, compiled (never run) for a
TPU topology or GPUs with their own compiler on any machine (the train job's dry run,
trainer/dry_run.py; partitioning/topologies.py). Prints JSON: bytes per device of each,
their ratio, or the compiler's refusal.

  make libtpu
  PYTHONPATH=.libtpu JAX_PLATFORMS=cpu .venv/bin/python bench/attention_memory.py
  make cuda_plugin
  PYTHONPATH=.cuda_plugin JAX_PLATFORMS=cpu .venv/bin/python bench/attention_memory.py \
    --topology h200:1
"""

import argparse
import dataclasses
import json
import pathlib
import platform

import gin
import jax

from ul2x import partitioning
from ul2x.partitioning import topologies
from ul2x.model import TransformerConfig
from ul2x.trainer import dry_run
from ul2x.trainer.optimizer import create_optimizer
from ul2x.trainer.setup import setup

MODEL = pathlib.Path(__file__).parents[1] / "gin_configs/models/small.gin"


def measure(mesh, cfg: TransformerConfig, attention: str, inputs: int, batch_size: int) -> dict:
  job = setup(dataclasses.replace(cfg, attention=attention), mesh=mesh,
              optimizer=create_optimizer(10, name="adafactor"))
  r = dry_run.measure(job, batch_size=batch_size, step_options={},
                      task_feature_lengths={"inputs": inputs, "targets": inputs // 4})
  return {"total_bytes": r["total_bytes"], "temp_bytes": r["temp_bytes"],
          "refused": r["compiler_out_of_memory"], "compile_seconds": r["compile_seconds"]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--topology", default="v5e:2x2")
  parser.add_argument("--gin_file", default=str(MODEL), help="the model's gin file")
  parser.add_argument("--lengths", default="2048,8192", help="input tokens (targets: 1/4)")
  parser.add_argument("--attentions", default="reference,flash",
                      help="the reference at 32k tokens aborts the compiler on a 24 GiB host")
  parser.add_argument("--batch_per_chip", type=int, default=1)
  args = parser.parse_args()
  gin.parse_config_file(args.gin_file)
  cfg = TransformerConfig()
  devices = topologies.topology_devices(args.topology)
  mesh = partitioning.create_mesh(data=len(devices), devices=devices)
  batch = args.batch_per_chip * len(devices)
  rows = []
  for inputs in map(int, args.lengths.split(",")):
    row = {"inputs": inputs, "targets": inputs // 4}
    for attention in args.attentions.split(","):
      row[attention] = measure(mesh, cfg, attention, inputs, batch)
    ref, flash = (row.get(a, {}).get("total_bytes") for a in ("reference", "flash"))
    row["flash_over_reference"] = ref and flash and flash / ref
    rows.append(row)
  print(json.dumps({"model": args.gin_file, "topology": args.topology,
                    "device_kind": devices[0].device_kind, "batch_size": batch,
                    "jax": jax.__version__, "host": platform.node(), "rows": rows}, indent=2))


if __name__ == "__main__":
  main()
