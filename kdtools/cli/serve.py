"""kd-serve: serve a model file over HTTP as an MLaaS-style victim (response mode, keys, quotas, defence)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Optional

import typer

from .. import __version__
from ..device import resolve_device
from ..errors import KdUsageError, counted
from ..fileio import atomic_path
from ..oracle import open_oracle, parse_mode
from ..weights import parse_shape
from ._common import DataRootOption, DebugOption, DeviceOption, check_paths, data_root, info, make_app, oracle_files, run_app, warn

app = make_app("Serve a model as an HTTP victim speaking the kdtools oracle protocol (GET /v1/info, POST /v1/query).\n\n"
               "Query it with kd-query http://HOST:PORT or any kd- attack. Listens on 127.0.0.1 unless --host says otherwise. "
               "Stops cleanly on Ctrl-C or SIGTERM. The protocol and the defence are described in docs/oracles.md.")


@app.command(help=app.info.help)  # one-command app: show the app's help
def serve(
    model: str = typer.Argument(..., help="The victim: a model file (or any oracle spec, e.g. replay:log.h5)."),
    mode: str = typer.Option("label", "--mode", help="Response mode(s) answered, comma-separated: label | probs | logits | topk:K."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8080, "--port", help="TCP port; 0 picks a free one (see --port-file)."),
    port_file: Optional[str] = typer.Option(None, "--port-file", help="Write the port actually bound to this file once listening."),
    quota: Optional[int] = typer.Option(None, "--quota", help="Query rows each key (or the anonymous client) may ask in total."),
    keys_file: Optional[str] = typer.Option(None, "--keys-file", help="File of API keys, one per line: 'KEY [QUOTA]'. Requests need one."),
    defense: str = typer.Option("none", "--defense", help="none | entropy (reject queries with outlying image entropy)."),
    defense_data: Optional[str] = typer.Option(None, "--defense-data", help="Victim training data to learn the entropy thresholds from."),
    defense_split: str = typer.Option("train", "--defense-split"),
    defense_quantile: float = typer.Option(0.01, "--defense-quantile", help="Thresholds at this quantile (and 1 - it) of the data's entropies."),
    defense_sides: str = typer.Option("both", "--defense-sides", help="both | low: reject outside \\[low, high], or only below low."),
    defense_load: Optional[str] = typer.Option(None, "--defense-load", help="Load learned thresholds (JSON) instead of --defense-data."),
    defense_save: Optional[str] = typer.Option(None, "--defense-save", help="Save the learned thresholds (JSON)."),
    max_batch: int = typer.Option(4096, "--max-batch", help="Most query rows in one request (HTTP 413 above)."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="CxHxW, for model files that do not record it."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow a pickled model file (runs code from it!)."),
    access_log: bool = typer.Option(False, "--access-log", help="One stderr line per request, whatever its status (rows, rejected, quota left, or the error; never keys)."),
    data_root_opt: Optional[str] = DataRootOption,
    device: str = DeviceOption,
    debug: bool = DebugOption,
):
    from ..serve import EntropyDefense, Quotas, VictimService, is_loopback, make_server, read_keys_file

    modes = [m.strip() for m in mode.split(",") if m.strip()]
    for m in modes:
        parse_mode(m)
    if quota is not None and quota < 0:
        raise KdUsageError("--quota must be >= 0")
    if max_batch <= 0:
        raise KdUsageError("--max-batch must be positive")
    if not 0 <= port <= 65535:
        raise KdUsageError("--port must be 0..65535")
    if defense not in ("none", "entropy"):
        raise KdUsageError(f"--defense {defense!r}: expected none or entropy")
    if defense == "entropy" and not (defense_data or defense_load):
        raise KdUsageError("--defense entropy needs --defense-data NAME (the victim's training data) or --defense-load FILE")
    if defense == "none" and (defense_data or defense_load):
        raise KdUsageError("--defense-data/--defense-load need --defense entropy")

    check_paths({"--defense-save": defense_save, "--port-file": port_file},
                {"the model file": oracle_files(model), "--keys-file": [keys_file]},
                stdout_flag=None)
    oracle = open_oracle(model, resolve_device(device), trust_pickle, parse_shape(input_shape) if input_shape else None)
    keys = read_keys_file(keys_file) if keys_file else None
    guard = None
    if defense == "entropy":
        if defense_load:
            guard = EntropyDefense.load(defense_load)
        else:
            from ..data import load_dataset

            c, h, _ = oracle.input_shape
            ds = load_dataset(defense_data, defense_split, data_root(data_root_opt), image_size=h, channels=c)
            guard = EntropyDefense.fit(ds.x, defense_quantile, defense_sides, f"{ds.title}, {len(ds)} images")
        if defense_save:
            guard.save(defense_save, {"model": model, "defense_data": defense_data, "defense_split": defense_split,
                                      "defense_quantile": defense_quantile, "defense_sides": defense_sides})
        hi = f"{guard.high:.3f}" if guard.sides == "both" else "-"
        info(f"kd-serve: entropy defence: pass {guard.low:.3f} <= H <= {hi} bits ({guard.fitted_on or defense_load})")

    def log_request(event: dict) -> None:
        # one line per request, whatever its status (the account is "key #N", never the key)
        who = event.get("account") or "-"
        if "rows" in event:  # an answered query
            left = "unlimited" if event["quota_left"] is None else event["quota_left"]
            info(f"kd-serve: {who}: {counted(event['rows'], 'query', 'queries')} ({event['mode']}), {event['rejected']} rejected, quota left {left}")
            return
        why = f": {event['error']}" if event.get("error") else ""
        info(f"kd-serve: {who}: {event.get('method', '-')} {event.get('path', '-')}: HTTP {event.get('status')}{why}")

    service = VictimService(oracle, modes, Quotas(keys, quota), guard, max_batch, log_request if access_log else None)
    server = make_server(service, host, port)
    bound = server.server_address[1]
    if not is_loopback(host):
        warn(f"kd-serve: listening on {host}, reachable from other machines")
    if port_file:
        with atomic_path(port_file) as tmp:  # appears whole, so a waiting script never reads half a number
            Path(tmp).write_text(f"{bound}\n")
    keys_text = f"{len(keys)} keys" if keys else "no keys"
    quota_text = f"quota {quota}" if quota is not None else "no quota"
    info(f"kd-serve {__version__}: serving {model} ({', '.join(modes)}; {keys_text}, {quota_text}) on http://{host}:{bound}")

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        # shutting down: a second signal (`timeout` signals the process and its group) must not interrupt the
        # cleanup or Python's exit handlers with a traceback
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        server.server_close()
        oracle.close()
    used = ", ".join(f"{a}: {u}" for a, u in zip(service.quotas.accounts, service.quotas.used))
    info(f"kd-serve: stopped after answering {counted(service.answered, 'query', 'queries')} ({service.rejected} rejected; {used})")


def main() -> None:
    run_app(app, "kd-serve")


if __name__ == "__main__":
    main()
