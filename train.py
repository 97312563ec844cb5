"""CLI: python -m ul2x.train --gin_file=gin_configs/runs/pretrain.gin --gin.MODEL_DIR="'/tmp/run'"."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from ul2x import gin_setup  # noqa: E402

DRY_RUN_ONLY = ("device_memory_gib", "peak_tflops", "dry_run_topology")


def add_dry_run_flags(parser) -> None:
  parser.add_argument("--dry_run", action="store_true",
                      help="compile the train step for the configured mesh and report memory "
                      "per device, FLOPs and whether it fits; trains nothing, reads no data, "
                      "writes nothing; exit status 1 if it does not fit")
  parser.add_argument("--device_memory_gib", type=float, default=None,
                      help="dry run: memory per device to fit in (default: the device's own, "
                      "where it reports it)")
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="dry run: peak TFLOP/s per device for the step-time bound "
                      "(default: the data sheet's, for known GPUs and TPUs)")
  parser.add_argument("--dry_run_topology", default=None,
                      help="dry run: compile for this TPU topology or these GPUs instead of "
                      "the local devices, e.g. v5e:4x4 (needs libtpu: make libtpu) or h100:8 "
                      "(needs JAX's CUDA plugin: make cuda_plugin)")


def main(argv: list[str]) -> None:
  args = gin_setup.start_job(argv, "Train a ul2x model.", "ul2x.trainer.loop",
                             add_flags=add_dry_run_flags)
  from ul2x.trainer import loop
  if not args.dry_run:
    for flag in DRY_RUN_ONLY:
      if getattr(args, flag) is not None:
        raise gin_setup.ConfigError(f"--{flag} applies to a dry run only; add --dry_run.")
    loop.train()  # writes MODEL_DIR/config.gin once the config and the data check out
    return
  from ul2x.partitioning.topologies import topology_devices
  from ul2x.trainer.dry_run import DryRun
  options = DryRun(args.device_memory_gib, args.peak_tflops)
  if args.dry_run_topology:  # the gin-configured mesh sizes over the topology's devices
    import gin
    devices = topology_devices(args.dry_run_topology)
    with gin.unlock_config():
      gin.bind_parameter("create_mesh.devices", devices)
  if loop.train(dry_run=options)["fits"] is False:
    sys.exit(1)


if __name__ == "__main__":
  gin_setup.run_cli(main)
