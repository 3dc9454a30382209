"""The course's command line: `python -m utils <command> --help`.

Each command's flags are the fields of the config dataclasses the notebooks use (utils/config.py),
so `--batch-size 32` here and `FeatureConfig(batch_size=32)` in a notebook are the same setting.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import (DataConfig, FeatureConfig, ModelConfig, RuntimeConfig, TrainConfig, add_arguments,
                     from_arguments, standin_preset)


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
    m = load_cache(out).meta
    print(f"feature cache ready at {out}: {m['num_images']} images, {m['num_captions']} captions, "
          f"{m['clip_dim']}-d {m['backbone']}; {m['num_skipped']} unreadable image(s)"
          + (f" listed in {out / 'skipped.csv'}" if m["num_skipped"] else ""))
    return out


def cmd_train(args):
    """Train on a feature cache; offline, the stand-in preset is the base the flags change."""
    from .features import default_cache_dir
    from .runtime import is_offline
    from .standins import clip_standin_name
    from .training import train

    data, runtime = from_arguments(DataConfig, args), _runtime(args)
    offline = is_offline(runtime.offline)
    model_base, train_base = standin_preset() if offline else (ModelConfig(), TrainConfig())
    model_cfg = from_arguments(ModelConfig, args, model_base)
    train_cfg = from_arguments(TrainConfig, args, train_base)
    backbone = clip_standin_name(model_cfg.backbone) if offline else model_cfg.backbone
    cache = args.features or default_cache_dir(data, backbone)
    result = train(cache, model_cfg, train_cfg, runtime, data.data_dir)
    val = f"{result.best_val_loss:.4f}" if result.best_val_loss is not None else "n/a (no validation split)"
    print(f"trained {result.steps} steps; best validation loss {val}\n"
          f"captioner bundle: {result.bundle}\nhistory: {result.out_dir / 'history.json'}")
    return result


def cmd_course(args) -> None:
    """The main job: every stage of the course in order, on the chosen dataset."""
    from .runtime import announce_offline, is_offline

    if is_offline(_runtime(args).offline):
        args.offline = True
        args.dataset = args.dataset or "embedded"
        announce_offline(f"running the course on the '{args.dataset}' dataset with stand-in models")
    print("== 1/3 download ==")
    captions = cmd_download(args) if args.dataset in (None, "embedded", "flickr30k", "food") else None
    print("== 2/3 CLIP features ==")
    args.features = str(cmd_features(args, captions))
    print("== 3/3 train the mapper ==")
    args.batch_size = args.num_workers = None  # those flags were the feature stage's
    cmd_train(args)


def cmd_bench(args) -> None:
    from .bench import bench_features

    result = bench_features(n_images=args.images, device=args.device or "auto", out_dir=Path(args.out))
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
    course = command("course", cmd_course, "the main job: run the course's stages end to end",
                     [DataConfig, FeatureConfig])
    add_arguments(course, ModelConfig, only=("mapper", "lm"))
    add_arguments(course, TrainConfig, only=("epochs", "max_steps", "lr"))
    bench = command("bench", cmd_bench, "measure feature extraction against the one-image-at-a-time way")
    bench.add_argument("--images", type=int, default=64, help="images per measurement")
    bench.add_argument("--out", default="bench/results", help="folder for the results table")
    return parser


def main(argv: list[str] | None = None) -> None:
    from .datasets import DatasetError
    from .download import DownloadError
    from .features import FeatureCacheError
    from .runtime import GPUUnsupported
    from .training import TrainingError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (DatasetError, DownloadError, FeatureCacheError, GPUUnsupported, TrainingError) as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
