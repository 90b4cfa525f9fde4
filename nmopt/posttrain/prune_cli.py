"""``nmopt prune MODEL``: prune a pretrained model on calibration text and write a model directory.

The command line's pretrained-model path (checkpoint files keep :mod:`nmopt.prune`): usage checks
before any work, load (:func:`~nmopt.posttrain.pretrained.load_pretrained`), calibration windows
from a text file, :func:`nmopt.prune_model`, then OUT_DIR (plus ``--masks`` / ``--report``)
written all together or not at all.
"""

from __future__ import annotations

import sys
from pathlib import Path

from nmopt import solvers
from nmopt.checkpoint import (
    AtomicFiles,
    check_output_paths,
    error_writing,
    write_checkpoint,
)
from nmopt.errors import UsageError
from nmopt.posttrain import PruneConfig, prune_model
from nmopt.posttrain.pretrained import (
    calibration_windows,
    encode,
    is_model_path,
    layer_masks,
    load_pretrained,
    max_positions,
    read_text,
    save_pretrained_dir,
)


def check_outputs(model_path, out, masks=None, report=None, force: bool = False) -> None:
    """Usage checks of ``nmopt prune MODEL`` done before any work; ValueError with one line."""
    model_path, out = Path(model_path), Path(out)
    if not model_path.exists():
        raise ValueError(f"MODEL {str(model_path)!r}: no such file or directory")
    if out.suffix.lower() in (".safetensors", ".pt", ".bin", ".pth", ".gguf"):
        raise ValueError(f"--out {str(out)!r}: a MODEL is written as a model directory; give a "
                         "directory path (no file extension)")
    if masks and Path(masks).suffix.lower() != ".safetensors":
        raise ValueError(f"--masks {masks!r}: masks are written as .safetensors")
    if report and Path(report).suffix.lower() != ".json":
        raise ValueError(f"--report {report!r}: the report is written as .json")
    outs = [("--out", out)] + [(f, v) for f, v in (("--masks", masks), ("--report", report)) if v]
    check_output_paths(model_path, outs, force, out_dir=True)


def check_device(device: str) -> None:
    """ValueError naming ``--device`` unless torch can hold the model there."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"--device {device!r}: not a torch device ({exc}); use cpu or cuda") from None
    if dev.type == "meta":
        raise ValueError("--device meta holds no data; use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: this PyTorch sees no CUDA device; use cpu (the "
                         "default) or install a CUDA build")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")


def prune_pretrained(model_path, out, config, calibration, *, nsamples: int = 32, seqlen: int = 512,
                     seed: int = 0, masks=None, report=None, force: bool = False, device=None,
                     progress: bool = True, log=print, blocks: str | None = None):
    """Load MODEL, prune it with :func:`nmopt.prune_model` on text calibration, write OUT_DIR.

    Parameters
    ----------
    model_path : Hugging Face model directory or ``.gguf`` file
    out : output model directory (``from_pretrained`` loads it back)
    config : PruneConfig
    calibration : UTF-8 text file; ``nsamples`` random windows of ``seqlen`` tokens (``seed``)
    masks, report : optional ``.safetensors`` (bool masks) and ``.json`` (``PruneReport``) paths
    force, device, progress, log : overwrite outputs, torch device, per-block bar, note printer
    blocks : the block list to prune (``prune_model``'s ``blocks``; default: found)

    Returns
    -------
    PruneReport
        Nothing is written until every block is pruned; all outputs appear together or none.
    """

    check_outputs(model_path, out, masks, report, force)
    text = read_text(calibration)
    loaded = load_pretrained(model_path, device)
    tokens = calibration_windows(encode(loaded.tokenizer, text), nsamples, seqlen, seed,
                                 max_positions(loaded.model.config))
    log(f"loaded {type(loaded.model).__name__} from {model_path}; calibration: {nsamples} x {seqlen} "
        f"tokens of {calibration} (seed {seed})")
    calib = tokens
    if getattr(loaded.model.config, "is_encoder_decoder", False):  # the decoder reads the text too
        calib = [{"input_ids": row[None], "decoder_input_ids": row[None]} for row in tokens]
    result = prune_model(loaded.model, calib, config, progress=progress, blocks=blocks)
    # the directory commits first: if that fails, AtomicFiles removes the staged files too
    with AtomicFiles(force=force) as files:
        staged = files.add_dir(out)
        try:
            save_pretrained_dir(loaded.model, loaded.tokenizer, staged,
                                None if loaded.gguf else loaded.source_dtype,
                                loaded.source_dtypes)
        except Exception as exc:  # noqa: BLE001 - disk full, quota, I/O error: one line naming --out
            raise error_writing(out, exc) from None
        if masks:
            write_checkpoint(files, layer_masks(loaded.model, result), masks)
        if report:
            Path(files.add(report)).write_text(result.to_json() + "\n", encoding="utf-8")
    return result


def run_prune_command(args, log=print) -> int:
    """``nmopt prune MODEL ...``: the command line's pretrained-model path; returns the exit code.

    Problems found before any work (bad flags, outputs that exist without ``--force``) raise
    :class:`nmopt.errors.UsageError` (exit code 2).
    """

    try:
        if not is_model_path(args.input):
            raise ValueError(f"--method {args.method or 'admm'} with --calibration needs a MODEL: {args.input!r} "
                             "must be a Hugging Face model directory or a .gguf file (checkpoint files are "
                             "pruned by magnitude only, without --calibration)")
        for flag, value in (("--saturate", args.saturate), ("--backend", args.backend)):
            if value:
                raise ValueError(f"{flag} applies to checkpoint files, not to a MODEL")

        if args.solver != "auto" and args.solver not in solvers.names():
            raise ValueError(f"--solver: unknown solver {args.solver!r}; choose auto or one of "
                             f"{', '.join(solvers.names())}")
        if not args.calibration:
            raise ValueError("pruning a MODEL needs --calibration TEXT_FILE")
        config = PruneConfig(pattern=args.pattern, transposable=not args.row_wise, method=args.method or "admm",
                             include=args.include, exclude=args.exclude, solver=args.solver, seed=args.seed)
        check_outputs(args.input, args.out, args.masks, args.report, args.force)
        if args.device is not None:
            check_device(args.device)
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None
    result = prune_pretrained(args.input, args.out, config, args.calibration, nsamples=args.nsamples,
                              seqlen=args.seqlen, seed=args.seed, masks=args.masks, report=args.report,
                              force=args.force, device=args.device,
                              progress=not args.no_progress and sys.stderr.isatty(), log=log,
                              blocks=args.blocks)
    log(result.table())
    for path, what in ((args.out, "pruned model"), (args.masks, "masks"), (args.report, "report")):
        if path:
            log(f"wrote {what}: {path}")
    return 0
