"""``cxrflow export``: a run's checkpoint, or an ensemble of runs, as an MLflow model folder or an
ONNX graph (:mod:`cxrflow.results.export`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cxrflow.errors import CxrflowError
from cxrflow.results.export import FORMATS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run", required=True, help="run folder written by 'cxrflow train', or an ensemble folder ('cxrflow ensemble')"
    )
    parser.add_argument(
        "--checkpoint", default=None, help="best_finetune, best_kt or last (default: best_finetune, else best_kt)"
    )
    parser.add_argument(
        "--format", required=True, choices=FORMATS, help="mlflow: an MLflow model folder; onnx: one ONNX graph"
    )
    parser.add_argument("--out", required=True, help="the model folder (mlflow) or the .onnx file (onnx)")
    parser.add_argument("--raw", action="store_true", help="export raw sigmoid outputs even when the run was evaluated")
    parser.add_argument(
        "--store", default=None, help="the training store, only for checkpoints that lack pixel statistics"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out")
    parser.add_argument(
        "--mlflow", default=None, metavar="URI", help="also log the model to this MLflow tracking server"
    )
    parser.add_argument(
        "--register", default=None, metavar="NAME", help="with --mlflow: register the logged model as NAME"
    )


def run(args: argparse.Namespace) -> int:
    if args.register and not args.mlflow:
        raise CxrflowError("--register needs --mlflow URI (the registry is the tracking server's)")
    if args.format == "onnx" and args.mlflow:
        raise CxrflowError("--mlflow logs MLflow models; use it with --format mlflow")
    from cxrflow.results.export import export_mlflow, log_mlflow
    from cxrflow.results.predict import load_predictor
    from cxrflow.runs import METRICS_NAME

    if args.checkpoint and (Path(args.run) / METRICS_NAME).is_file():
        raise CxrflowError(
            "--checkpoint picks a run's checkpoint; an ensemble folder names its members' itself", args.run
        )
    predictor = load_predictor(args.run, args.checkpoint, store=args.store, raw=args.raw)
    if getattr(predictor, "note", None):
        print(f"note: {predictor.note}", file=sys.stderr)
    if args.format == "onnx":
        from cxrflow.results.ensembleexport import ensemble_spec, is_ensemble
        from cxrflow.results.onnxexport import export_onnx, graph_size
        from cxrflow.results.score import predictor_spec

        out = Path(args.out)
        _check_file_target(out, args.overwrite)
        graph_size(predictor)  # an ensemble whose members take different sizes is refused before any work
        spec = (
            ensemble_spec(predictor, _member_names(args.run)) if is_ensemble(predictor) else predictor_spec(predictor)
        )
        graph, side, diff = export_onnx(predictor, spec, out)
        print(f"wrote {graph} and {side} (largest difference to PyTorch {diff:.2e})")
        return 0
    folder = export_mlflow(predictor, args.run, Path(args.out), overwrite=args.overwrite)
    print(f"wrote {folder} ({'calibrated' if predictor.calibrated else 'raw'} probabilities); "
          f"serve it with: mlflow models serve -m {folder} --env-manager local")  # fmt: skip
    if args.mlflow:
        uri = log_mlflow(folder, args.mlflow, args.register)
        print(f"logged to {args.mlflow}: {uri}" + (f" (registered as {args.register})" if args.register else ""))
    return 0


def _member_names(ensemble: str) -> list[str]:
    from cxrflow.atomic import read_json_object
    from cxrflow.runs import METRICS_NAME

    return list(read_json_object(Path(ensemble) / METRICS_NAME, "ensemble").get("member_names") or [])


def _check_file_target(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise CxrflowError("is a folder; give the .onnx file to write", out)
    if out.exists() and not overwrite:
        raise CxrflowError("exists; pass --overwrite to replace it", out)
    if not out.parent.is_dir():
        raise CxrflowError("its folder does not exist", out)
