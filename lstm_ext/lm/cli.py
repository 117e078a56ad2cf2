"""`lstm-ext train | eval | generate | export | classify` (also `python -m lstm_ext ...`)."""

import argparse
import json
import os
import sys
from pathlib import Path

from . import data as lm_data
from ..quantized import quantize_dynamic
from .checkpoint import load_checkpoint, model_from_checkpoint
from .classify import ClassifyConfig, classify
from .config import PRECISIONS, TrainConfig, config_from_dict
from .export import FORMATS, export
from .generate import generate
from .train import evaluate, quality, train


def _zoneout_pair(text):
    """--zoneout Z_C,Z_H or Z (both)."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or not all(0 <= value <= 1 for value in values):
        raise argparse.ArgumentTypeError(
            f"expected Z_C,Z_H (or one Z for both), probabilities between 0 and 1, got {text!r}")
    return values


def _add_train_arguments(parser, given_only=False):
    """The train command's options; with `given_only`, none has a default, so that parsing
    shows which ones the command line gave (what a --resume may change)."""
    defaults = TrainConfig()

    def add(*names, **options):
        if given_only:
            options["default"] = argparse.SUPPRESS
        parser.add_argument(*names, **options)

    add("--data", default=None, help="a text file (split 90/5/5) or a folder with train/valid/"
        "test files (ptb.train.txt, train.txt, wiki.train.tokens); default: the Python standard "
        "library's own source")
    add("--level", choices=lm_data.LEVELS, default=defaults.level)
    add("--no-clean", dest="clean", action="store_false",
        help="keep the text as it is (no Unicode/line-end normalisation)")
    add("--impl", choices=("ext", "torch"), default=defaults.impl,
        help="lstm_ext.LSTM or torch.nn.LSTM (same initial weights for the same seed)")
    add("--layers", type=int, default=defaults.layers)
    add("--hidden", type=int, default=defaults.hidden)
    add("--emb", type=int, default=defaults.emb)
    add("--dropout", type=float, default=defaults.dropout)
    add("--proj-size", type=int, default=defaults.proj_size)
    add("--tied", action="store_true", help="share embedding and decoder weights")
    add("--forget-bias", type=float, default=defaults.forget_bias,
        help="added to the LSTM's forget-gate biases at initialisation (lstm_ext."
        "initialize_gates; 1 is Keras's unit_forget_bias), for either --impl")
    add("--weight-drop", type=float, default=defaults.weight_drop,
        help="DropConnect on the LSTM's recurrent weights, a fresh mask per forward, as in "
        "AWD-LSTM (0.5 there); --impl ext only")
    add("--recurrent-dropout", type=float, default=defaults.recurrent_dropout,
        help="variational dropout on the h entering each recurrent product, one mask per "
        "sequence for all its steps (Gal & Ghahramani 2016; Keras's recurrent_dropout); "
        "--impl ext only")
    add("--zoneout", type=_zoneout_pair, default=defaults.zoneout, metavar="Z_C,Z_H",
        help="zoneout (Krueger et al. 2016): each unit keeps its previous c (h) with "
        "probability Z_C (Z_H) at each step in training, the expectation in eval; one number "
        "for both; --impl ext only")
    add("--layer-norm", action="store_true",
        help="the LayerNorm LSTM (Ba et al. 2016): normalised gate products and cell; "
        "--impl ext only")
    add("--bptt", type=int, default=defaults.bptt, help="steps per truncated-BPTT window")
    add("--batch-size", type=int, default=defaults.batch_size)
    add("--optimizer", choices=("sgd", "adamw"), default=defaults.optimizer,
        help="sgd: divide the rate by 4 when validation stops improving; adamw: warm-up + cosine")
    add("--lr", type=float, default=defaults.lr)
    add("--weight-decay", type=float, default=defaults.weight_decay)
    add("--warmup", type=int, default=defaults.warmup, help="AdamW warm-up steps")
    add("--clip", type=float, default=defaults.clip, help="gradient-norm clip (0: off)")
    add("--epochs", type=int, default=defaults.epochs,
        help="passes over the training split (0: as many as --max-steps needs, else 1); "
        "with --max-steps too, whichever ends first (--max-steps 0 for whole epochs only)")
    add("--max-steps", type=int, default=defaults.max_steps,
        help="training steps (default 1000; 0: no limit); the cosine schedule "
        "ends here. With --resume, a "
        "larger value trains the run on: the warm-up + cosine schedule is recomputed over the "
        "new total, so the rate rises to where a run planned that long would be now")
    add("--time-budget", type=float, default=defaults.time_budget,
        help="minutes of training before a last evaluation and stop (0: no limit); a cap, the "
        "schedule still follows --max-steps / --epochs")
    add("--precision", choices=PRECISIONS, default=defaults.precision,
        help="bf16: autocast with fp32 weights; fp64: for exact comparisons")
    add("--device", default=defaults.device, help="cpu or cuda")
    add("--seed", type=int, default=defaults.seed)
    add("--out", default=defaults.out, help="folder for checkpoints, metrics.jsonl and loss.png")
    add("--eval-every", type=int, default=defaults.eval_every, help="steps between evaluations")
    add("--resume", default=None, metavar="DIR",
        help="continue the run in this folder from its last checkpoint, with its own settings; "
        "only --max-steps, --epochs, --time-budget, --eval-every and --no-progress may be "
        "given to change them (larger --max-steps/--epochs train a finished run on), any other "
        "setting that differs is refused")
    add("--no-progress", dest="progress", action="store_false")


def _add_classify_arguments(parser):
    defaults = ClassifyConfig()
    add = parser.add_argument
    add("--impl", choices=("ext", "torch"), default=defaults.impl,
        help="lstm_ext.LSTM or torch.nn.LSTM (same initial weights for the same seed)")
    add("--features", type=int, default=defaults.features, help="values per sequence step")
    add("--hidden", type=int, default=defaults.hidden)
    add("--layers", type=int, default=defaults.layers, help="stacked LSTM layers")
    add("--length", type=int, default=defaults.length, help="steps per sequence")
    add("--noise", type=float, default=defaults.noise,
        help="standard deviation of the Gaussian noise added to every step")
    add("--forget-bias", type=float, default=defaults.forget_bias,
        help="added to the forget-gate bias at initialisation")
    add("--batch-size", type=int, default=defaults.batch_size)
    add("--steps", type=int, default=defaults.steps, help="training batches (fresh sequences)")
    add("--lr", type=float, default=defaults.lr, help="Adam learning rate")
    add("--clip", type=float, default=defaults.clip, help="gradient-norm clip (0: off)")
    add("--test-size", type=int, default=defaults.test_size, help="held-out sequences")
    add("--eval-every", type=int, default=defaults.eval_every)
    add("--device", default=defaults.device, help="cpu or cuda")
    add("--seed", type=int, default=defaults.seed)
    add("--out", default=defaults.out,
        help="folder for metrics.jsonl and the trained model (default: write nothing)")
    add("--no-progress", dest="progress", action="store_false")


INT8_HELP = ("run the LSTM with int8 weights (lstm_ext.quantize_dynamic: per-row scales, fp32 "
             "math; CPU)")


def _model(args, payload):
    """The checkpoint's model, its LSTM converted to int8 weights when --int8 asks."""
    if args.int8 and args.device != "cpu":
        raise ValueError("--int8 runs on the CPU; drop --device or --int8")
    model, vocabulary, config = model_from_checkpoint(payload, args.device)
    if args.int8:
        model = quantize_dynamic(model.float())
    return model, vocabulary, config


def build_parser(given_only=False):
    parser = argparse.ArgumentParser(prog="lstm-ext", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command")
    _add_train_arguments(commands.add_parser("train", help="train a language model"), given_only)
    evaluation = commands.add_parser("eval", help="loss and perplexity/bpc of a checkpoint")
    evaluation.add_argument("--checkpoint", required=True, help="a .pt file or a run folder")
    evaluation.add_argument("--split", choices=lm_data.SPLITS, default="test")
    evaluation.add_argument("--data", default=None,
                            help="evaluate on this corpus instead of the run's own")
    evaluation.add_argument("--device", default="cpu")
    evaluation.add_argument("--int8", action="store_true", help=INT8_HELP)
    generation = commands.add_parser("generate", help="sample text from a checkpoint")
    generation.add_argument("--checkpoint", required=True, help="a .pt file or a run folder")
    generation.add_argument("--prompt", default="")
    generation.add_argument("--tokens", type=int, default=200)
    generation.add_argument("--temperature", type=float, default=0.8)
    generation.add_argument("--top-k", type=int, default=0)
    generation.add_argument("--seed", type=int, default=None)
    generation.add_argument("--device", default="cpu")
    generation.add_argument("--int8", action="store_true", help=INT8_HELP)
    exporting = commands.add_parser(
        "export", help="write a trained model as ONNX or as an AOTInductor package")
    exporting.add_argument("--checkpoint", required=True, help="a .pt file or a run folder")
    exporting.add_argument("--format", choices=FORMATS, required=True,
                           help="onnx: an ONNX model (needs pip install .[onnx]); aoti: a "
                                "torch.export program compiled by AOTInductor (.pt2)")
    exporting.add_argument("--out", required=True, help="the file to write")
    _add_classify_arguments(commands.add_parser(
        "classify", help="stacked-LSTM sequence classifier on the temporal-order problem"))
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(["train"] if argv == [] or (argv is None and len(sys.argv) == 1)
                             else argv)

    try:
        if args.command == "train":
            config = config_from_dict(vars(args))
            changes = None
            if args.resume:
                given = vars(build_parser(given_only=True).parse_args(argv))
                changes = {k: v for k, v in given.items() if k not in ("command", "resume")}
            record = train(config, resume=args.resume, changes=changes)
            if os.environ.get("RANK", "0") == "0":  # one summary per torchrun job
                out = args.resume or config.out
                print(json.dumps({**record, "checkpoint": str(Path(out) / "best.pt")}))
        elif args.command == "eval":
            payload = load_checkpoint(args.checkpoint)
            model, vocabulary, config = _model(args, payload)
            corpus = lm_data.load_corpus(args.data or config.data, config.level, config.clean,
                                         vocabulary)
            loss = evaluate(model, getattr(corpus, args.split), config)
            metric = quality(loss, config.level)
            print(json.dumps({"split": args.split, "loss": loss,
                              **{k.replace("valid_", ""): v for k, v in metric.items()}}))
        elif args.command == "generate":
            payload = load_checkpoint(args.checkpoint)
            model, vocabulary, config = _model(args, payload)
            sys.stdout.write(args.prompt)
            for text in generate(model, vocabulary, config.level, args.prompt, args.tokens,
                                 args.temperature, args.top_k, args.seed, args.device):
                sys.stdout.write(text)
                sys.stdout.flush()
            sys.stdout.write("\n")
        elif args.command == "export":
            print(json.dumps(export(args.checkpoint, args.format, args.out)))
        elif args.command == "classify":
            print(json.dumps(classify(ClassifyConfig(**{
                key: value for key, value in vars(args).items() if key != "command"}))))
        else:
            parser.print_help()
            return 2
    except (FileNotFoundError, ValueError, FloatingPointError) as error:
        print(f"lstm-ext: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
