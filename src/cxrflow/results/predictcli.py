"""``cxrflow predict``: new image files (:mod:`cxrflow.results.predict`), or with ``--out`` a whole
store or collection scored as a Spark job (:mod:`cxrflow.results.batchscore`).

Only the wiring lives here, so that neither of the two modules imports the other.
"""

from __future__ import annotations

import argparse

from cxrflow.errors import CxrflowError
from cxrflow.results import batchscore, predict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    predict.add_arguments(parser)
    batchscore.add_batch_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.out is None:
        return predict.run(args)
    if args.run is None:
        raise CxrflowError("give --run RUN: the run whose model scores the store")
    predictor = predict.load_predictor(args.run, args.checkpoint, device=args.device, store=args.store, raw=args.raw)
    return batchscore.run_batch(args, predictor)
