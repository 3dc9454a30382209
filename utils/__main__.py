"""The course's command line: `python -m utils <command> --help`.

Each command's flags are the fields of the config dataclasses the notebooks use (utils/config.py),
so `--batch-size 32` here and `FeatureConfig(batch_size=32)` in a notebook are the same setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .config import (DataConfig, DecodeConfig, FeatureConfig, ModelConfig, RuntimeConfig, TrainConfig,
                     add_arguments, decode_config, from_arguments, given_arguments, standin_preset)
from .errors import CourseError


def _runtime(args) -> RuntimeConfig:
    return from_arguments(RuntimeConfig, args)


def _captions(data: DataConfig, runtime: RuntimeConfig):
    from .course import load_captions

    return load_captions(data, runtime)[0]


def cmd_info(args) -> None:
    from .features import FeatureCacheError, load_cache
    from .paths import features_dir, models_dir
    from .setup import environment_report

    report = environment_report(args.device or "auto")
    width = max(map(len, report))
    for key, value in report.items():
        print(f"{key:>{width}}: {value}")
    features, models = features_dir(args.data_dir), models_dir(args.data_dir)
    caches = sorted(p.parent for p in features.glob("*/meta.json"))
    print(f"\nfeature caches under {features}: {len(caches) or 'none'}")
    for path in caches:
        try:
            m = load_cache(path).meta
            print(f"  {path.name}: {m['num_images']} images, {m['num_captions']} captions, {m['backbone']} "
                  f"({m['clip_dim']}-d){' [stand-in]' if m['standin'] else ''}, {m['num_skipped']} skipped")
        except FeatureCacheError as exc:
            print(f"  {path.name}: {str(exc).splitlines()[0]}")
    from .standins import standins_home

    for where, folder in (("downloaded models", models), ("stand-in models (this machine's)", standins_home())):
        found = sorted(p.name for p in folder.glob("*")) if folder.is_dir() else []
        print(f"{where} under {folder}: {', '.join(found) or 'none'}")


def cmd_download(args):
    from .course import load_captions
    from .download import downloadable

    data, runtime = from_arguments(DataConfig, args), _runtime(args)
    if data.dataset == "coco" and not data.path:  # COCO by its URLs; then the reader takes what came
        from dataclasses import replace

        from .download import download_coco
        from .runtime import is_offline

        data = replace(data, path=str(download_coco(data.data_dir, getattr(args, "split", None) or "train2014",
                                                    data.max_images, offline=is_offline(runtime.offline),
                                                    base_url=getattr(args, "base_url", None))))
        return _captions(data, runtime)
    if data.dataset == "hf" and data.path:  # a Hub set is downloaded by reading it (its images written once)
        return _captions(data, runtime)
    if not downloadable(data.dataset):
        sys.exit(f"--dataset {data.dataset} is read from your own files (--path); there is nothing to download.")
    captions, root = load_captions(data, runtime)
    print(f"dataset ready at {root or data.path}")
    return captions


def cmd_features(args) -> Path:
    from .course import report_cache
    from .features import cache_features, load_cache

    data, runtime = from_arguments(DataConfig, args), _runtime(args)
    out = cache_features(_captions(data, runtime), from_arguments(FeatureConfig, args), data, runtime)
    report_cache(load_cache(out))
    return out


def cmd_train(args):
    """Train on a feature cache; offline, the stand-in preset is the base the flags change."""
    from accelerate import PartialState

    from .config import default_configs
    from .course import training_report
    from .paths import default_cache_dir
    from .runtime import is_offline
    from .training import TrainingInterrupted, train

    data, runtime = from_arguments(DataConfig, args), _runtime(args)
    offline = is_offline(runtime.offline)
    model_base, train_base = default_configs(offline)
    model_cfg = from_arguments(ModelConfig, args, model_base)
    train_cfg = from_arguments(TrainConfig, args, train_base)
    cache = args.features or default_cache_dir(data, model_cfg.backbone, offline)
    try:
        result = train(cache, model_cfg, train_cfg, runtime, data.data_dir)
    except TrainingInterrupted as exc:  # Ctrl-C / SIGTERM: the checkpoint is written; one line, no traceback
        if PartialState().is_main_process:
            print(exc, file=sys.stderr)
        sys.exit(exc.exit_code)
    PartialState().print(training_report(result))
    return result


def _load_captioner(args):
    from .captioner import Captioner
    from .runtime import resolve_device

    return Captioner.from_pretrained(args.model, resolve_device(_runtime(args).device))


def _image_files(targets: list[str]) -> list[str]:
    """Files as given (an unreadable one is reported later, by name); folders: the images inside, sorted."""
    from .images import IMAGE_SUFFIXES

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
    from .translate import add_translations, load_translator

    # --translate: loaded first, so a language without a model fails before any captioning
    translator = load_translator(args.translate, _runtime(args).offline) if getattr(args, "translate", None) else None
    captioner = captioner or _load_captioner(args)
    paths = _image_files(args.images)
    results = add_translations(captioner.caption_files(paths, decode), translator)
    if len(results) == 1 and results[0]["error"]:  # one image: one line, the one the web demo gives
        sys.exit(f"error: {results[0]['image']} cannot be captioned: {results[0]['error']}.")
    for r in results:
        if r["error"]:
            print(f"skipped {r['image']}: {r['error']} (replace or remove the file)", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if r["caption"] is not None:  # one line per caption: several with num_return_sequences
                for i, caption in enumerate([r["caption"]] if isinstance(r["caption"], str) else r["caption"]):
                    translation = r.get("translation")  # --translate: a third column
                    translation = ([translation] if isinstance(translation, str) else translation or [])[i:i + 1]
                    print("\t".join([r["image"], caption, *translation]))
    if not any(r["caption"] is not None for r in results):
        sys.exit(f"error: none of the {len(paths)} image(s) could be captioned.")
    return results


def cmd_evaluate(args, captioner=None) -> dict:
    """Score a captioner on a split of a feature cache (default: the cache it was trained on)."""
    from .evaluation import CLIP_METRICS, clip_note, evaluate_split
    from .metrics import METRICS
    from .features import load_cache, training_cache

    decode = decode_config(**given_arguments(DecodeConfig, args))
    captioner = captioner or _load_captioner(args)
    cache = load_cache(args.features) if args.features else training_cache(captioner)  # or: where it looked
    features = cache.path
    scores, per_image = evaluate_split(captioner, cache, args.split, decode, args.clip_score, args.out,
                                       args.metrics or METRICS)
    if args.json:
        note = clip_note(bool(cache.meta.get("standin")), cache.meta.get("dataset"))
        notes = {metric: note for metric in CLIP_METRICS if metric in scores and note}
        print(json.dumps({"split": args.split, "images": len(per_image), "scores": scores} |
                         ({"notes": notes} if notes else {}), indent=2))
    else:
        from .calibration import closing_report

        print(f"{len(per_image)} '{args.split}' images of {features}, captioned by {decode.method} decoding "
              "(scores x100):")
        table, what_next = closing_report(captioner, cache, scores, per_image, clip_score=args.clip_score,
                                          metrics=args.metrics or METRICS)
        print(table.to_string())
        print(what_next)
    if args.out:
        print(f"scores and per-image captions written to {args.out}", file=sys.stderr if args.json else sys.stdout)
    return scores


def cmd_course(args):
    """The main job: every stage of the course in order, on the chosen dataset (course.run_course)."""
    from .config import default_configs
    from .course import run_course
    from .runtime import is_offline

    runtime = _runtime(args)
    model_base, train_base = default_configs(is_offline(runtime.offline))
    # two stages, one namespace: --batch-size is training's, --feature-batch-size and --num-workers the features'
    features = given_arguments(FeatureConfig, args) | {"batch_size": args.feature_batch_size}
    train = given_arguments(TrainConfig, args)
    decode = decode_config(**given_arguments(DecodeConfig, args))  # contradictions: refused before training
    return run_course(from_arguments(DataConfig, args), _with(FeatureConfig(), features),
                      from_arguments(ModelConfig, args, model_base), _with(train_base, train), runtime, decode,
                      fresh=args.fresh)


def _with(config, settings: dict):
    """`config` with the settings that are not None."""
    return dataclasses.replace(config, **{k: v for k, v in settings.items() if v is not None})


def cmd_serve(args) -> None:
    """The web demo of a trained captioner, until Ctrl+C; the page's knobs start from the decoding flags."""
    from .features import training_cache
    from .model import CaptionerError
    from .serve import VALIDATION, bundle_title, create_app, folder_examples, make_demo_server, validation_examples

    decode = decode_config(**given_arguments(DecodeConfig, args))
    if args.examples:  # checked before the captioner loads: a wrong folder fails at once
        examples, examples_are = folder_examples(args.examples), f"images of the folder {args.examples}"
    captioner = _load_captioner(args)
    if not args.examples:
        examples, examples_are = validation_examples(captioner), VALIDATION
        if not examples:
            try:
                why = f"no validation images in the feature cache at {training_cache(captioner).path}"
            except CaptionerError as exc:
                why = str(exc)
            print(f"no example gallery: {why}; show a folder of images with --examples DIR", file=sys.stderr)
    from .translate import Translators

    app = create_app(captioner, examples, decode, title=bundle_title(args.model), examples_are=examples_are,
                     translators=Translators(_runtime(args).offline))  # --offline: the stand-in translator too
    try:  # port 0: a free port, the one printed below
        server = make_demo_server(app, args.host, args.port)  # a port in use: werkzeug says so, exits 1
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
    from .bench_gpu import bench_gpu
    from .bench_training import bench_training

    device, out = args.device or "auto", Path(args.out)
    models_dir = None  # the stand-ins' per-machine folder (standins.standins_home())
    if args.what == "gpu":
        bench_gpu(args.quick, device, args.precision, args.compile, models_dir=models_dir, out_dir=out)
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


def cmd_export(args) -> None:
    from .share import export_file

    out = export_file(args.model, args.out)
    print(f"one file: {out} ({out.stat().st_size / 2**20:.1f} MiB); load it with "
          f"Captioner.from_pretrained({str(out)!r}) or --model {out}")


def cmd_publish(args) -> None:
    from .runtime import is_offline
    from .share import publish

    where = publish(args.model, args.to, offline=is_offline(_runtime(args).offline), private=args.private)
    print(f"published {args.model} to {where}; load it with Captioner.from_pretrained({args.to!r})")


COURSE_HELP = ("the main job: run the course's stages end to end. Run again, it reuses a finished feature cache and "
               "training run and continues unfinished ones (--fresh: a new run). --batch-size is the training "
               "batch; --feature-batch-size and --num-workers are the feature stage's.")


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
    download = command("download", cmd_download, "fetch a dataset (Kaggle / attached input / embedded / COCO / a Hugging Face set)",
                       [DataConfig])
    download.add_argument("--split", default=None, help="coco: train2014 (default), val2014, train2017 or val2017")
    download.add_argument("--base-url", default=None, help="coco: where annotations/ and the images are "
                          "(default: CLIPCAP_COCO_URL, else http://images.cocodataset.org)")
    command("features", cmd_features, "cache CLIP image features (resumable)", [DataConfig, FeatureConfig])
    train = command("train", cmd_train, "train the mapper (and chosen LM blocks) on cached features; offline, "
                    "the stand-in preset changes some defaults (shown as 'offline: ...')", [DataConfig])
    for cls, base in zip((ModelConfig, TrainConfig), standin_preset()):
        add_arguments(train, cls, skip=("clip_dim",), base=base)
    train.add_argument("--features", default=None, help="feature cache folder (default: from dataset + backbone)")
    caption = command("caption", cmd_caption, "caption image files and folders with a trained captioner")
    caption.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files and folders of images")
    caption.add_argument("--translate", default=None, metavar="LANG", help="also translate each caption to LANG "
                         "(de, fr, ...) with Helsinki-NLP/opus-mt-en-LANG (offline: a stand-in, labelled so)")
    evaluate = command("evaluate", cmd_evaluate, "score a trained captioner on a split of a feature cache")
    evaluate.add_argument("--split", default="test", help="train, val or test (default: test)")
    evaluate.add_argument("--features", default=None,
                          help="feature cache folder (default: the one the captioner was trained on)")
    evaluate.add_argument("--out", default=None, help="write scores and per-image captions to this JSON file")
    evaluate.add_argument("--metrics", nargs="+", default=None, help="default: BLEU METEOR ROUGE_L CIDEr SPICE")
    evaluate.add_argument("--clip-score", action=argparse.BooleanOptionalAction, default=True,
                          help="CLIPScore and RefCLIPScore (reads the images again)")
    for p in (caption, evaluate):
        p.add_argument("--model", required=True, help="captioner bundle: a folder (training writes <run>/captioner), "
                       "a .clipcap file, a Hub id (user/name) or kaggle:OWNER/MODEL/FRAMEWORK/VARIATION[/VERSION]")
        p.add_argument("--json", action="store_true", help="print JSON instead of text")
    course = command("course", cmd_course, COURSE_HELP, [DataConfig])
    add_arguments(course, FeatureConfig, skip=("batch_size",))
    course.add_argument("--feature-batch-size", type=int, default=None,
                        help="images per CLIP forward pass in the feature stage (FeatureConfig.batch_size; "
                             "`features --batch-size`)")
    add_arguments(course, ModelConfig, only=("mapper", "lm"))
    add_arguments(course, TrainConfig, only=("epochs", "batch_size", "max_steps", "lr", "out_dir"))
    course.add_argument("--fresh", action="store_true",
                        help="train a new run even where a finished or unfinished one is (the earlier run is "
                             "kept, renamed <run>.1); without it a finished run is reused, an unfinished one "
                             "resumed")
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
    export = command("export", cmd_export, "write a captioner bundle as one .clipcap file (loads like the folder)")
    export.add_argument("--model", required=True, help="captioner bundle folder")
    export.add_argument("--out", default=None, help="the file (default: <bundle>.clipcap beside the bundle)")
    publish = command("publish", cmd_publish, "upload a captioner bundle to the Hugging Face Hub or Kaggle Models")
    publish.add_argument("--model", required=True, help="captioner bundle folder")
    publish.add_argument("--to", required=True, metavar="hub:USER/NAME|kaggle:OWNER/NAME",
                         help="where: the Hub (needs `huggingface-cli login`) or Kaggle Models (KAGGLE_API_TOKEN)")
    publish.add_argument("--private", action="store_true", help="hub: a private repository")
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
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CourseError,  # every stage's refusal: one line that says what to do (errors.py)
            FileNotFoundError) as exc:  # FileNotFoundError: a path given on the command line is not there
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
