"""Memory per TPU chip of a T5 v1.1 small-like encoder-decoder's train step with the
reference attention against the flash kernels, by length, compiled (never run) for a
TPU topology with libtpu on any machine (the train job's dry run, trainer/dry_run.py).
Prints JSON: bytes per device of each, their ratio, or the compiler's refusal.

  make libtpu
  PYTHONPATH=.libtpu JAX_PLATFORMS=cpu .venv/bin/python bench/tpu_memory.py
"""

import argparse
import dataclasses
import json
import platform

import jax

from ul2x import partitioning
from ul2x.model import TransformerConfig
from ul2x.trainer import dry_run
from ul2x.trainer.optimizer import create_optimizer
from ul2x.trainer.setup import setup

# gin_configs/models/small.gin: 8+8 layers, d_model 512, bfloat16, full remat, scanned.
CONFIG = TransformerConfig(vocab_size=384, emb_dim=512, num_heads=6, head_dim=64,
                           mlp_dim=1024, num_encoder_layers=8, num_decoder_layers=8,
                           activation="gelu", dtype="bfloat16", remat=True, scan_layers=True)


def measure(mesh, attention: str, inputs: int, batch_size: int) -> dict:
  job = setup(dataclasses.replace(CONFIG, attention=attention), mesh=mesh,
              optimizer=create_optimizer(10, name="adafactor"))
  r = dry_run.measure(job, batch_size=batch_size, step_options={},
                      task_feature_lengths={"inputs": inputs, "targets": inputs // 4})
  return {"total_bytes": r["total_bytes"], "temp_bytes": r["temp_bytes"],
          "refused": r["compiler_out_of_memory"], "compile_seconds": r["compile_seconds"]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--topology", default="v5e:2x2")
  parser.add_argument("--lengths", default="2048,8192", help="input tokens (targets: 1/4)")
  parser.add_argument("--attentions", default="reference,flash",
                      help="the reference at 32k tokens aborts the compiler on a 24 GiB host")
  parser.add_argument("--batch_per_chip", type=int, default=1)
  args = parser.parse_args()
  devices = dry_run.topology_devices(args.topology)
  mesh = partitioning.create_mesh(data=len(devices), devices=devices)
  batch = args.batch_per_chip * len(devices)
  rows = []
  for inputs in map(int, args.lengths.split(",")):
    row = {"inputs": inputs, "targets": inputs // 4}
    for attention in args.attentions.split(","):
      row[attention] = measure(mesh, attention, inputs, batch)
    ref, flash = (row.get(a, {}).get("total_bytes") for a in ("reference", "flash"))
    row["flash_over_reference"] = ref and flash and flash / ref
    rows.append(row)
  print(json.dumps({"topology": args.topology, "device_kind": devices[0].device_kind,
                    "batch_size": batch, "jax": jax.__version__, "host": platform.node(),
                    "rows": rows}, indent=2))


if __name__ == "__main__":
  main()
