"""The course's command line: `python -m utils <command> --help`.

Each command's flags are the fields of the config dataclasses the notebooks use (utils/config.py),
so `--batch-size 32` here and `FeatureConfig(batch_size=32)` in a notebook are the same setting.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import (DataConfig, DecodeConfig, DecodeConfigError, FeatureConfig, ModelConfig, RuntimeConfig,
                     TrainConfig, add_arguments, decode_config, from_arguments, given_arguments, standin_preset)


def _runtime(args) -> RuntimeConfig:
    return from_arguments(RuntimeConfig, args)


def _root_for(data: DataConfig, runtime: RuntimeConfig) -> Path | None:
    """Folder of a downloadable dataset (fetched if needed); None for the user's own files."""
    from .download import KAGGLE_DATASETS, download
    from .runtime import is_offline

    if data.dataset == "embedded" or data.dataset in KAGGLE_DATASETS:
        return download(data.dataset, data.data_dir, offline=is_offline(runtime.offline))
    return None


def _captions(data: DataConfig, runtime: RuntimeConfig):
    from .datasets import load_records

    captions = load_records(data, _root_for(data, runtime))
    print(captions.summary())
    for line in captions.problems[:20]:
        print("  note:", line)
    if len(captions.problems) > 20:
        print(f"  ... and {len(captions.problems) - 20} more notes")
    return captions


def cmd_info(args) -> None:
    from .features import load_cache, FeatureCacheError
    from .runtime import environment_report

    report = environment_report(args.device or "auto")
    width = max(map(len, report))
    for key, value in report.items():
        print(f"{key:>{width}}: {value}")
    data_dir = Path(args.data_dir or DataConfig().data_dir)
    caches = sorted(p.parent for p in (data_dir / "features").glob("*/meta.json"))
    print(f"\nfeature caches under {data_dir / 'features'}: {len(caches) or 'none'}")
    for path in caches:
        try:
            m = load_cache(path).meta
            print(f"  {path.name}: {m['num_images']} images, {m['num_captions']} captions, {m['backbone']} "
                  f"({m['clip_dim']}-d){' [stand-in]' if m['standin'] else ''}, {m['num_skipped']} skipped")
        except FeatureCacheError as exc:
            print(f"  {path.name}: {str(exc).splitlines()[0]}")
    models = sorted(p.name for p in (data_dir / "models").glob("*")) if (data_dir / "models").is_dir() else []
    print(f"models under {data_dir / 'models'}: {', '.join(models) or 'none'}")


def cmd_download(args):
    data, runtime = from_arguments(DataConfig, args), _runtime(args)
    root = _root_for(data, runtime)
    if root is None:
        sys.exit(f"--dataset {data.dataset} is read from your own files (--path); there is nothing to download.")
    captions = _captions(data, runtime)
    print(f"dataset ready at {root}")
    return captions


def cmd_features(args, captions=None) -> Path:
    from .features import cache_features, load_cache

    data, runtime = from_arguments(DataConfig, args), _runtime(args)
    feats = from_arguments(FeatureConfig, args)
    out = cache_features(captions or _captions(data, runtime), feats, data, runtime)
    cache = load_cache(out)
    m = cache.meta
    print(f"feature cache ready at {out}: {m['num_images']} images, {m['num_captions']} captions, "
          f"{m['clip_dim']}-d {m['backbone']}; {m['num_skipped']} unreadable image(s)"
          + (f" listed in {out / 'skipped.csv'}" if m["num_skipped"] else ""))
    for path, reason in cache.skipped[["image_path", "reason"]].head(10).itertuples(index=False):
        print(f"  skipped {path}: {reason}")
    if m["num_skipped"] > 10:
        print(f"  ... and {m['num_skipped'] - 10} more")
    return out


def cmd_train(args):
    """Train on a feature cache; offline, the stand-in preset is the base the flags change."""
    from accelerate import PartialState

    from .features import default_cache_dir
    from .runtime import is_offline
    from .training import train

    data, runtime = from_arguments(DataConfig, args), _runtime(args)
    offline = is_offline(runtime.offline)
    model_base, train_base = standin_preset() if offline else (ModelConfig(), TrainConfig())
    model_cfg = from_arguments(ModelConfig, args, model_base)
    train_cfg = from_arguments(TrainConfig, args, train_base)
    cache = args.features or default_cache_dir(data, model_cfg.backbone, offline)
    result = train(cache, model_cfg, train_cfg, runtime, data.data_dir)
    val = f"{result.best_val_loss:.4f}" if result.best_val_loss is not None else "n/a (no validation split)"
    PartialState().print(f"trained {result.steps} steps; best validation loss {val}\n"
          f"captioner bundle: {result.bundle}\nhistory: {result.out_dir / 'history.json'}")
    return result


def _load_captioner(args):
    from .captioner import Captioner
    from .runtime import resolve_device

    return Captioner.from_pretrained(args.model, resolve_device(_runtime(args).device))


def _image_files(targets: list[str]) -> list[str]:
    """Files as given (an unreadable one is reported later, by name); folders: the images inside, sorted."""
    from .datasets import IMAGE_SUFFIXES

    files = []
    for target in targets:
        if not Path(target).is_dir():
            files.append(target)
            continue
        found = sorted(str(p) for p in Path(target).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not found:
            print(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in the folder {target}", file=sys.stderr)
        files += found
    return files


def cmd_caption(args, captioner=None) -> list[dict]:
    """Caption image files and folders; an unreadable image is named with its reason, the rest captioned."""
    decode = decode_config(**given_arguments(DecodeConfig, args))
    captioner = captioner or _load_captioner(args)
    paths = _image_files(args.images)
    results = captioner.caption_files(paths, decode)
    for r in results:
        if r["error"]:
            print(f"skipped {r['image']}: {r['error']} (replace or remove the file)", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if r["caption"] is not None:  # one line per caption: several with num_return_sequences
                for caption in [r["caption"]] if isinstance(r["caption"], str) else r["caption"]:
                    print(f"{r['image']}\t{caption}")
    if not any(r["caption"] is not None for r in results):
        sys.exit(f"error: none of the {len(paths)} image(s) could be captioned.")
    return results


def cmd_evaluate(args, captioner=None) -> dict:
    """Score a captioner on a split of a feature cache (default: the cache it was trained on)."""
    from .evaluation import METRICS, evaluate_split, results_table
    from .features import load_cache

    decode = decode_config(**given_arguments(DecodeConfig, args))
    captioner = captioner or _load_captioner(args)
    features = args.features or captioner.summary.get("features")
    if not features:
        sys.exit(f"error: the bundle {args.model} does not name the feature cache it was trained on: pass "
                 "--features CACHE_DIR.")
    scores, per_image = evaluate_split(captioner, load_cache(features), args.split, decode, args.clip_score,
                                       args.out, args.metrics or METRICS)
    if args.json:
        print(json.dumps({"split": args.split, "images": len(per_image), "scores": scores}, indent=2))
    else:
        print(f"{len(per_image)} '{args.split}' images of {features}, captioned by {decode.method} decoding "
              "(scores x100):")
        print(results_table(scores).to_string())
    if args.out:
        print(f"scores and per-image captions written to {args.out}", file=sys.stderr if args.json else sys.stdout)
    return scores


def cmd_course(args) -> None:
    """The main job: every stage of the course in order, on the chosen dataset."""
    from .features import load_cache
    from .runtime import announce_offline, is_offline

    if is_offline(_runtime(args).offline):
        args.offline = True
        args.dataset = args.dataset or "embedded"
        announce_offline(f"running the course on the '{args.dataset}' dataset with stand-in models")
    decode_config(**given_arguments(DecodeConfig, args))  # contradictory decoding flags: refused before training
    print("== 1/5 download ==")
    captions = cmd_download(args) if args.dataset in (None, "embedded", "flickr30k", "food") else None
    print("== 2/5 CLIP features ==")
    args.features = str(cmd_features(args, captions))
    print("== 3/5 train the mapper ==")
    args.batch_size = args.num_workers = None  # those flags were the feature stage's
    result = cmd_train(args)
    args.model = str(result.bundle)
    captioner = _load_captioner(args)
    images = load_cache(args.features).images
    args.images = images.loc[images["split"] == "test", "image_path"].head(5).to_list()
    print("== 4/5 caption ==")
    if not args.images:
        print("the test split is empty, so there is nothing to caption or evaluate: use more images")
        return
    args.json = False
    cmd_caption(args, captioner)
    print("== 5/5 evaluate ==")
    args.split, args.clip_score, args.metrics = "test", True, None
    args.out = str(result.out_dir / "results-test.json")
    cmd_evaluate(args, captioner)


def cmd_serve(args) -> None:
    """The web demo of a trained captioner, until Ctrl+C; the page's knobs start from the decoding flags."""
    from werkzeug.serving import make_server

    from .serve import VALIDATION, bundle_title, create_app, folder_examples, validation_examples

    decode = decode_config(**given_arguments(DecodeConfig, args))
    if args.examples:  # checked before the captioner loads: a wrong folder fails at once
        examples, examples_are = folder_examples(args.examples), f"images of the folder {args.examples}"
    captioner = _load_captioner(args)
    if not args.examples:
        examples, examples_are = validation_examples(captioner), VALIDATION
        if not examples:
            print(f"no example gallery: no validation images in the feature cache the bundle was trained on "
                  f"({captioner.summary.get('features') or 'not named'}) here; show a folder with --examples DIR",
                  file=sys.stderr)
    app = create_app(captioner, examples, decode, title=bundle_title(args.model), examples_are=examples_are)
    try:  # port 0: a free port, the one printed below
        server = make_server(args.host, args.port, app, threaded=True)  # a port in use: werkzeug says so, exits 1
    except OSError as exc:
        sys.exit(f"error: cannot serve on {args.host} port {args.port}: {exc.strerror or exc}")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"serving on {args.host}: anyone who can reach this machine can use the demo", file=sys.stderr)
    where = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(args.host, args.host)  # an address a browser can open
    where = f"[{where}]" if ":" in where else where  # IPv6 goes in brackets in a URL
    print(f"the demo of {args.model}: open http://{where}:{server.port}/ (Ctrl+C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def cmd_import_clipcap(args) -> None:
    """The ClipCap paper's released weights as a bundle that `caption` and `evaluate` take."""
    from .clipcap_import import describe, import_clipcap

    captioner = import_clipcap(args.weights, args.out, _runtime(args), **given_arguments(ModelConfig, args))
    print(f"imported {describe(captioner)}\ncaptioner bundle: {args.out}\n"
          f"try it: python -m utils caption --model {args.out} IMAGE_OR_DIR")


def cmd_bench(args) -> None:
    """Each benchmark measures ours and the ClipCap way in the same run and writes a results table."""
    from . import bench
    from .bench_training import bench_training

    device, out = args.device or "auto", Path(args.out)
    models_dir = Path(DataConfig().data_dir) / "models"
    if args.what == "gpu":
        bench.bench_gpu(args.quick, device, args.precision, args.compile, models_dir=models_dir, out_dir=out)
        return
    which = ("features", "training", "captioning") if args.what == "all" else (args.what,)
    for name in which:
        if name == "features":
            result = bench.bench_features(n_images=args.images, device=device, out_dir=out)
        elif name == "training":
            result = bench_training(steps=args.steps, batch_size=args.batch_size, device=device, arch=args.arch,
                                    models_dir=models_dir, out_dir=out, precision=args.precision,
                                    compile=args.compile)
        else:
            result = bench.bench_captioning(images=args.images, device=device, arch=args.arch,
                                            models_dir=models_dir, out_dir=out)
        print(json.dumps(result["summary"], indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m utils", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, func, help, configs=()):
        p = sub.add_parser(name, help=help, description=help)
        add_arguments(p, RuntimeConfig)
        for cls in configs:  # the CLIP width is read from the feature cache, never given
            add_arguments(p, cls, skip=("clip_dim",))
        p.set_defaults(func=func)
        return p

    info = command("info", cmd_info, "print the environment, GPU check and what is cached")
    info.add_argument("--data-dir", default=None)
    command("download", cmd_download, "fetch a dataset (Kaggle / attached input / embedded)", [DataConfig])
    command("features", cmd_features, "cache CLIP image features (resumable)", [DataConfig, FeatureConfig])
    train = command("train", cmd_train, "train the mapper (and chosen LM blocks) on cached features",
                    [DataConfig, ModelConfig, TrainConfig])
    train.add_argument("--features", default=None, help="feature cache folder (default: from dataset + backbone)")
    caption = command("caption", cmd_caption, "caption image files and folders with a trained captioner")
    caption.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files and folders of images")
    evaluate = command("evaluate", cmd_evaluate, "score a trained captioner on a split of a feature cache")
    evaluate.add_argument("--split", default="test", help="train, val or test (default: test)")
    evaluate.add_argument("--features", default=None,
                          help="feature cache folder (default: the one the captioner was trained on)")
    evaluate.add_argument("--out", default=None, help="write scores and per-image captions to this JSON file")
    evaluate.add_argument("--metrics", nargs="+", default=None, help="default: BLEU METEOR ROUGE_L CIDEr SPICE")
    evaluate.add_argument("--clip-score", action=argparse.BooleanOptionalAction, default=True,
                          help="CLIPScore and RefCLIPScore (reads the images again)")
    for p in (caption, evaluate):
        p.add_argument("--model", required=True, help="captioner bundle folder (training writes <run>/captioner)")
        p.add_argument("--json", action="store_true", help="print JSON instead of text")
    course = command("course", cmd_course, "the main job: run the course's stages end to end",
                     [DataConfig, FeatureConfig])
    add_arguments(course, ModelConfig, only=("mapper", "lm"))
    add_arguments(course, TrainConfig, only=("epochs", "max_steps", "lr"))
    serve = command("serve", cmd_serve, "a web page: upload a photo, turn the decoding knobs, read the captions")
    serve.add_argument("--model", required=True, help="captioner bundle folder (training writes <run>/captioner)")
    serve.add_argument("--port", type=int, default=5002, help="0: any free port (the one printed)")
    serve.add_argument("--host", default="127.0.0.1", help="127.0.0.1: this machine only (0.0.0.0: the network)")
    serve.add_argument("--examples", default=None, metavar="DIR",
                       help="a folder of images for the gallery (default: the validation images of the bundle's "
                            "feature cache)")
    for p in (caption, evaluate, course, serve):  # --seed is RuntimeConfig's, and seeds sampling too
        add_arguments(p, DecodeConfig, skip=("seed",))
    clipcap = command("import-clipcap", cmd_import_clipcap,
                      "turn the ClipCap paper's released weights into a captioner bundle")
    clipcap.add_argument("weights", metavar="WEIGHTS.pt", help="coco_weights.pt, conceptual_weights.pt or "
                         "transformer_weights.pt from github.com/rmokady/CLIP_prefix_caption")
    clipcap.add_argument("--out", required=True, help="folder for the bundle")
    add_arguments(clipcap, ModelConfig, only=("backbone", "mapper", "prefix_length", "lm"))
    bench = command("bench", cmd_bench, "measure features / training / captioning against the ClipCap way")
    bench.add_argument("what", nargs="?", default="features",
                       choices=("features", "training", "captioning", "all", "gpu"))
    bench.add_argument("--images", type=int, default=32, help="images per measurement (features, captioning)")
    bench.add_argument("--steps", type=int, default=30, help="timed training steps (the median is reported)")
    bench.add_argument("--batch-size", type=int, default=40, help="training: captions per step")
    bench.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                       help="training precision (auto: as training chooses; fp16: the T4/P100 path)")
    bench.add_argument("--compile", action="store_true", help="time the training step under torch.compile (GPU)")
    bench.add_argument("--quick", action="store_true", help="gpu: the small version, on the CPU, in seconds")
    bench.add_argument("--arch", default="real", choices=("real", "tiny"),
                       help="real: CLIP ViT-B/32 and GPT-2 124M shapes; tiny: the stand-in sizes (quick checks)")
    bench.add_argument("--out", default="bench/results", help="folder for the results table")
    return parser


def main(argv: list[str] | None = None) -> None:
    from .captioner import CaptionerError
    from .clipcap_import import ClipCapImportError
    from .datasets import DatasetError
    from .download import DownloadError
    from .evaluation import EvaluationError
    from .features import FeatureCacheError
    from .files import DiskFull
    from .runtime import GPUUnsupported
    from .training import TrainingError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CaptionerError, ClipCapImportError, DatasetError, DecodeConfigError, DiskFull, DownloadError,
            EvaluationError, FeatureCacheError, GPUUnsupported, TrainingError,
            FileNotFoundError) as exc:  # FileNotFoundError: a path given on the command line is not there
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
