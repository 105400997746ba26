"""Chat with MiniGPT-4 about an image and watch the AdaVIB diagnostics (H/log V, α, nearest words).

`python demo.py` in a checkout and `adavib-demo` once installed both run this module (the top-level demo.py
only hands over to it).

    python demo.py                                            # tiny default model (see below), CPU is fine
    python demo.py --cfg-path eval_configs/adavib_minigpt4_7b.yaml \
        --options model.encoder_path=weights/minigpt4_encoder.safetensors model.llm_path=weights/vicuna-7b-v0
    python demo.py --cfg-path eval_configs/minigpt4_7b_original.yaml --options ... \
        --compare-ckpt out/adavib_minigpt4_7b/final/trainable.safetensors      # two projectors side by side

Only the `model:` section of the config is read. Without --cfg-path the demo runs the trained tiny
shapes-world model at assets/shapes_base/model.yaml if it exists, else a tiny random MiniGPT-4 (it babbles,
but every part of the page works). --compare-ckpt loads a second projector (a trainable.safetensors of this
project) into a copy of the projector only; the ViT, Q-Former and LLM are shared, not duplicated.
The page offers example images (the shapes world's with the default model; --examples for others), shows the
image enlarged to a readable size, and next to each projector's nearest-words table a bar plot of the same top-k
similarity distribution. The server listens on 127.0.0.1 unless --host says otherwise; --share asks Gradio for a
public link.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cfg-path", help="eval/train YAML whose model: section is used (default: tiny model)")
    ap.add_argument("--options", nargs="*", default=[], help="model overrides, e.g. model.llm_path=weights/vicuna")
    ap.add_argument("--compare-ckpt", help="second projector (trainable.safetensors) for compare mode")
    ap.add_argument("--synonyms", help="CHAIR synonyms file for highlighting (default: the config's "
                    "eval.chair.synonyms, the shapes world's for the shapes default, else COCO's)")
    ap.add_argument("--gpu-id", type=int, default=0, help="CUDA device index; the CPU is used without CUDA, or with -1")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=7860, help="TCP port, 1-65535, free (checked before the model loads)")
    ap.add_argument("--share", action="store_true", help="create a public Gradio share link")
    ap.add_argument("--max-pixels", type=int, default=None, help="refuse larger uploads (default 40 MP)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default of the slider (64, tiny model 32)")
    ap.add_argument("--top-k", type=int, default=10, help="nearest vocabulary entries shown per image")
    ap.add_argument("--seed", type=int, default=0, help="torch seed (random-init weights, sampling)")
    ap.add_argument("--examples", nargs="+", metavar="IMAGE", help="example images shown on the page (default: "
                    "four shapes-world scenes when the default shapes-world model runs)")
    return ap.parse_args(argv)


def listen_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port, or None: checked before the model is loaded (minutes at 7B),
    not when Gradio starts after it. The probe binds as uvicorn does (SO_REUSEADDR, so a port in TIME_WAIT is free,
    one with a live listener is not) and closes at once; a port taken between this check and the launch is caught
    at the launch."""
    if not 1 <= port <= 65535:
        return f"--port {port}: expected a TCP port number from 1 to 65535"
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        return f"--host {host!r}: not an address or a name this machine can resolve ({err.strerror})"
    family, kind, proto, _, address = addresses[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return (f"--port {port}: another program already listens on {host}:{port} (a demo still running?); "
                        f"stop it or choose another --port, e.g. --port {port + 1 if port < 65535 else port - 1}")
            if err.errno == errno.EACCES:
                return f"--port {port}: permission denied on {host} (ports below 1024 need administrator rights)"
            if err.errno == errno.EADDRNOTAVAIL:
                return f"--host {host!r}: not an address of this machine"
            return f"cannot listen on {host}:{port}: {err.strerror}"
    return None


def example_images(args: argparse.Namespace, loading) -> list[str]:
    """--examples as given (each must be a file), else the shapes world's scenes for its default model."""
    if args.examples:
        missing = [p for p in args.examples if not os.path.isfile(p)]
        if missing:
            from minigpt4.common.config import ConfigError

            raise ConfigError(f"--examples: not a file: {', '.join(missing)}")
        return list(args.examples)
    if args.cfg_path is None and loading.SHAPES_BASE_YAML.is_file():
        return loading.shapes_example_images()
    return []


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (problem := listen_problem(args.host, args.port)) is not None:  # before minutes of model loading
        print(f"error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from minigpt4.common.config import ConfigError
    from minigpt4.demo import loading
    from minigpt4.demo.chat import DEMO_MAX_PIXELS, DecodingSettings, DemoEngine
    from minigpt4.models.checkpoints import CheckpointError
    from minigpt4.models.from_config import build_model

    torch.manual_seed(args.seed)
    try:
        if args.cfg_path:
            cfg = loading.load_model_config(args.cfg_path, args.options)
        elif args.options:
            raise ConfigError("--options needs --cfg-path (the tiny default model takes no overrides)")
        else:
            cfg = loading.default_model_config()
        vis_processor, config_synonyms = loading.demo_extras(args.cfg_path)
        device = loading.resolve_device(args.gpu_id)
        model = build_model(cfg, device=device).eval()
        compare = loading.with_projector_checkpoint(model, args.compare_ckpt) if args.compare_ckpt else None
        image_processor = loading.image_processor_for(model, vis_processor)
        examples = example_images(args, loading)
    except (ConfigError, CheckpointError, ValueError) as err:  # bad config / checkpoint / transform settings
        print(f"error: {err}", file=sys.stderr)
        return 2
    synonyms = args.synonyms or config_synonyms

    def scorer_factory():
        from minigpt4.eval.chair import CHAIRScorer

        return CHAIRScorer(synonyms)

    engine = DemoEngine(model, image_processor, compare_model=compare, scorer_factory=scorer_factory,
                        max_pixels=args.max_pixels or DEMO_MAX_PIXELS, top_k=args.top_k)
    try:
        _ = engine.scorer  # load the synonyms and NLTK's tables now, not during the first answer
    except (OSError, ValueError, LookupError, ImportError) as err:
        print(f"error: CHAIR highlighting ({synonyms or 'COCO synonyms'}): {err}", file=sys.stderr)
        return 2
    tiny = cfg.llm_path is None and cfg.full_ckpt is None
    max_new = args.max_new_tokens or (32 if tiny else 64)

    from minigpt4.demo.app import build_demo, launch_options

    demo = build_demo(engine, model_description=loading.describe_model(cfg), compare_description=args.compare_ckpt,
                      defaults=DecodingSettings(max_new_tokens=max_new), examples=examples)
    logging.info("serving on http://%s:%d (device %s)", args.host, args.port, device)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, max_file_size="50mb",
                    show_error=False, **launch_options())
    except OSError as err:  # the port was taken while the model loaded
        print(f"error: cannot listen on {args.host}:{args.port}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
