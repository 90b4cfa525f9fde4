"""``nmopt bench prune-memory``: time and peak memory of ``nmopt prune`` on a sharded checkpoint.

Generates a Hugging Face style checkpoint in a temporary directory: ``--size-mib`` of N(0,1)
``--dim`` x ``--dim`` matrices (``--dtype``, seed 0) in ``--shards`` shards with their index,
plus a ``config.json``. Each run is a fresh Python process, its peak resident memory the
VmHWM it reads from /proc at exit, its time the wall clock:

- ``stream``: ``nmopt prune DIR --pattern P --out OUT --masks MASKS`` (this version's streaming);
- ``stream nm-packed``: the same with ``--format nm-packed`` (also records the output size);
- ``load whole``: the previous path on the same tensors as one state dict: every shard loaded
  with :func:`nmopt.checkpoint.load`, :func:`nmopt.prune.prune_state_dict` with one
  ``find_mask`` call per layer, then the pruned checkpoint and the masks saved as one file each;
- ``--model FILE.gguf`` (optional): the model converted once to a safetensors model directory
  (float32), then ``stream`` and ``load whole`` on it.

Writes ``--json`` / ``--markdown`` (``--out DIR``: ``DIR/prune-memory.{json,md}``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from nmopt._report import Column, add_output_arguments, environment, format_table, markdown_table, write_outputs
from nmopt.bench._args import check_out_dir, integer
from nmopt.safetensors_stream import CODES, HF_INDEX, SafetensorsWriter, model_shards

STEM = "prune-memory"
TARGET_MIB = 512  # issue 14: a 1 GiB checkpoint in 8 shards prunes with peak RSS <= 1/2 GiB

_LOAD_WHOLE = r"""
import sys
from pathlib import Path
import nmopt.prune as prune
from nmopt.checkpoint import load, save
from nmopt.safetensors_stream import model_shards
src, out, masks, pattern = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
prune.BLOCK_WEIGHTS = 1 << 62  # one find_mask call per layer, as before blocks
tensors = {}
for shard in model_shards(src)[0]:
    tensors.update(load(src / shard))
res = prune.prune_state_dict(tensors, pattern, progress=False)
save(res.tensors, out)
save(res.masks, masks)
"""


def generate(directory: Path, size_mib: int, dim: int, shards: int, dtype: str) -> dict:
    """A sharded checkpoint of N(0,1) ``dim`` x ``dim`` matrices, written a matrix at a time."""
    itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
    count = max(shards, round(size_mib * 2**20 / (dim * dim * itemsize)))
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True)
    weight_map, per = {}, -(-count // shards)
    for s in range(shards):
        names = [f"model.layers.{i}.mlp.weight" for i in range(s * per, min(count, (s + 1) * per))]
        shard = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        with SafetensorsWriter(directory / shard, [(n, CODES[dtype], (dim, dim)) for n in names],
                               {"format": "pt"}) as w:
            for n in names:
                a = rng.standard_normal((dim, dim), dtype=np.float32)
                w.write(n, (a.view(np.uint32) >> 16).astype(np.uint16) if dtype == "bfloat16" else a.astype(dtype))
                weight_map[n] = shard
    total = count * dim * dim * itemsize
    (directory / HF_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (directory / "config.json").write_text("{}\n")
    return {"tensors": count, "shards": shards, "dim": dim, "dtype": dtype, "bytes": total}


#: Runs ``python -m MODULE ...`` or ``python -c CODE ...`` in this process and writes its peak
#: resident memory (VmHWM, KiB) to argv[1] at exit. The peak is read inside the process: the
#: ``ru_maxrss`` that wait4 reports also counts the parent's memory at the fork.
_PEAK = r"""
import atexit, runpy, sys
def _peak(path=sys.argv[1]):
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    with open(path, "w") as f:
        f.write(str(kib))
atexit.register(_peak)
flag, target = sys.argv[2], sys.argv[3]
sys.argv = [target] + sys.argv[4:]
if flag == "-m":
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    exec(compile(target, "<bench>", "exec"), {"__name__": "__main__"})
"""


def measure(cmd: list[str], log_path: Path) -> dict:
    """Run ``cmd`` (``python -m ...`` or ``python -c ...``) in a fresh process: its wall seconds
    and peak RSS, read inside it from /proc (where there is no /proc: ``ru_maxrss``, which
    also counts this process's memory at the fork)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    peak_file = log_path.with_suffix(".peak")
    peak_file.unlink(missing_ok=True)
    if Path("/proc/self/status").exists():
        cmd = [cmd[0], "-c", _PEAK, str(peak_file), *cmd[1:]]
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
    peak_kib = int(peak_file.read_text()) if peak_file.exists() else usage.ru_maxrss
    peak_file.unlink(missing_ok=True)
    return {"seconds": seconds, "peak_rss_mib": peak_kib / 1024, "returncode": proc.returncode,
            "error": None if proc.returncode == 0 else tail[0]}


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def run_case(label: str, src: Path, work: Path, pattern: str, log) -> list[dict]:
    """Stream, stream nm-packed and load-whole runs on the model directory ``src``."""
    cli = [sys.executable, "-m", "nmopt.cli", "prune", str(src), "--pattern", pattern, "--no-progress"]
    weights = sum(_size(src / s) for s in model_shards(src)[0])
    runs = (("stream", cli + ["--out", str(work / "out"), "--masks", str(work / "masks.safetensors")], "out"),
            ("stream nm-packed", cli + ["--out", str(work / "packed"), "--format", "nm-packed"], "packed"),
            ("load whole", [sys.executable, "-c", _LOAD_WHOLE, str(src), str(work / "whole.safetensors"),
                            str(work / "whole-masks.safetensors"), pattern], "whole.safetensors"))
    rows = []
    for run, cmd, output in runs:
        row = {"checkpoint": label, "run": run, "checkpoint_mib": weights / 2**20, **measure(cmd, work / "log.txt")}
        if row["returncode"] == 0:
            out = work / output
            row["output_mib"] = sum(_size(out / s) for s in model_shards(out)[0]) / 2**20 if out.is_dir() \
                else _size(out) / 2**20
            row["output_fraction"] = row["output_mib"] / row["checkpoint_mib"]
        row["peak_fraction"] = row["peak_rss_mib"] / row["checkpoint_mib"]
        log(f"  {label} {run}: {row['seconds']:.1f} s, peak RSS {row['peak_rss_mib']:.0f} MiB"
            + (f" ({row['error']})" if row["error"] else ""))
        rows.append(row)
        for p in work.iterdir():
            if p.name != "log.txt":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    return rows


def convert_model(gguf: str, directory: Path) -> None:
    """The GGUF model as a float32 safetensors model directory (transformers)."""
    from nmopt.posttrain.pretrained import load_pretrained, save_pretrained_dir  # imports torch

    loaded = load_pretrained(gguf)
    directory.mkdir(parents=True)
    save_pretrained_dir(loaded.model, loaded.tokenizer, directory)


def run(args, log=print) -> dict:
    with tempfile.TemporaryDirectory(prefix="nmopt-prune-memory-", dir=args.tmp) as tmp:
        tmp = Path(tmp)
        work = tmp / "work"
        work.mkdir()
        t0 = time.perf_counter()
        made = generate(tmp / "ckpt", args.size_mib, args.dim, args.shards, args.dtype)
        log(f"generated {made['bytes'] / 2**20:.0f} MiB in {made['shards']} shards "
            f"({made['tensors']} x {args.dim}^2 {args.dtype}) in {time.perf_counter() - t0:.1f} s")
        rows = run_case("generated", tmp / "ckpt", work, args.pattern, log)
        model = None
        if args.model:
            shutil.rmtree(tmp / "ckpt")
            # in a child: the conversion loads torch and transformers, which this process never needs
            subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from nmopt.bench."
                            "prune_memory import convert_model; convert_model(sys.argv[1], Path(sys.argv[2]))",
                            args.model, str(tmp / "model")], check=True, capture_output=True)
            model = {"path": args.model, "bytes": _size(tmp / "model" / "model.safetensors")}
            rows += run_case(Path(args.model).name, tmp / "model", work, args.pattern, log)
    stream = next(r for r in rows if r["run"] == "stream")
    return {"benchmark": STEM, "pattern": args.pattern, "generated": made, "model": model, "rows": rows,
            "target": {"label": f"stream peak RSS <= {TARGET_MIB} MiB (issue 14, 1 GiB in 8 shards)",
                       "value_mib": stream["peak_rss_mib"],  # a failed run meets nothing
                       "met": stream["returncode"] == 0 and stream["peak_rss_mib"] <= TARGET_MIB},
            "command": " ".join(["nmopt bench prune-memory", *args.argv]), "environment": environment()}


COLUMNS = [Column("checkpoint", "checkpoint", align="<"), Column("run", "run", align="<"),
           Column("checkpoint_mib", "MiB", "{:.0f}"), Column("seconds", "seconds", "{:.1f}"),
           Column("peak_rss_mib", "peak RSS MiB", "{:.0f}"), Column("peak_fraction", "peak/ckpt", "{:.2f}"),
           Column("output_fraction", "output/ckpt", lambda v: "-" if v is None else f"{v:.3f}")]


def format_markdown(result: dict) -> str:
    g, t = result["generated"], result["target"]
    lines = [f"# nmopt bench prune-memory ({result['pattern']})", "",
             f"Command: `{result['command']}`", "",
             f"Generated checkpoint: {g['bytes'] / 2**30:.2f} GiB, {g['tensors']} x {g['dim']}² {g['dtype']} "
             f"in {g['shards']} shards." + (f" Model: `{result['model']['path']}` as a float32 safetensors "
                                           "directory." if result["model"] else ""), "",
             markdown_table(result["rows"], COLUMNS), "",
             f"Target: {t['label']}: {t['value_mib']:.0f} MiB, **{'met' if t['met'] else 'missed'}**.", "",
             "Each run is a fresh process; peak RSS is its VmHWM, read inside it at exit. *stream*: `nmopt prune DIR` "
             "(with `--masks`); *stream nm-packed*: `--format nm-packed` (output/ckpt: its size); *load whole*: "
             "every shard loaded, `prune_state_dict` with one `find_mask` per layer, outputs saved as one file "
             "each (the path before streaming).", ""]
    return "\n".join(lines)


def main(args) -> int:
    if args.out:
        check_out_dir(args.out)
        args.json = args.json or str(Path(args.out) / f"{STEM}.json")
        args.markdown = args.markdown or str(Path(args.out) / f"{STEM}.md")
    args.argv = [a for a in sys.argv[3:]] if sys.argv[1:3] == ["bench", "prune-memory"] else []
    result = run(args, log=(lambda *a: None) if args.quiet else print)
    print(format_table(result["rows"], COLUMNS))
    print(f"{result['target']['label']}: {'met' if result['target']['met'] else 'missed'}")
    if args.out:  # made only now: a failed run leaves no empty directory
        Path(args.out).mkdir(parents=True, exist_ok=True)
    write_outputs(args, result, format_markdown(result))
    return 0 if all(r["returncode"] == 0 for r in result["rows"]) else 1


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("prune-memory", help="time and peak memory of nmopt prune on a sharded "
                              "checkpoint, streamed vs loaded whole", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mib", type=integer(1), default=32, help="checkpoint size (default 32; the record: 2048)")
    p.add_argument("--dim", type=integer(1), default=512, help="matrix side (default 512; the record: 4096)")
    p.add_argument("--shards", type=integer(1), default=4, help="shards (default 4; the record: 8)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--pattern", default="4:8", help="N:M (default 4:8)")
    p.add_argument("--model", metavar="FILE.gguf", help="also a real model, converted to safetensors first")
    p.add_argument("--tmp", metavar="DIR", help="where to generate the checkpoint (default: the system's)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", metavar="DIR", help=f"write DIR/{STEM}.json and .md")
    add_output_arguments(p, plot=False)  # a table, nothing to draw
    p.set_defaults(func=main)
    return p
