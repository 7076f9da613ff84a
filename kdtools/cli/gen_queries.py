"""kd-gen-queries: synthesise queries for a black-box model and write them as a stream or file."""

from __future__ import annotations

from typing import Optional

import typer

from .. import __version__
from ..data import load_dataset
from ..errors import KdUsageError
from ..queries import dataset_batches, noise_batches
from ..stream import StreamHeader, fields_of
from ..weights import load_model, parse_shape
from ._common import DataRootOption, DebugOption, data_root, info, make_app, not_yet, open_sink, run_app

app = make_app("Synthesise queries (noise, public data; data-free generators come with issue #4, AEDM with #6).\n\n"
               "Writes a kdtools stream on stdout (pipe it into kd-query) or a file with -o (.h5 for HDF5).")

Output = typer.Option("-", "-o", "--output", help="Output file (.h5 -> HDF5, else stream file); '-' = stdout.")


def _write(batches, n: int, source: dict, output: str) -> None:
    first = next(batches, None)
    if first is None:
        raise KdUsageError("-n must be positive")
    header = StreamHeader("queries", fields_of(first), extra={"generator": source, "kdtools": __version__})
    sink = open_sink(header, output)
    try:
        sink.write(first)
        for b in batches:
            sink.write(b)
    except BaseException:
        sink.abort()
        raise
    sink.close()
    info(f"kd-gen-queries: wrote {sink.rows} queries {'x'.join(map(str, header.x_shape))}" + ("" if output == "-" else f" to {output}"))


def _like_shape(like: Optional[str], shape: Optional[str]) -> Optional[tuple]:
    if shape:
        return parse_shape(shape)
    if like:
        loaded = load_model(like)
        return loaded.input_shape
    return None


@app.command()
def noise(
    n: int = typer.Option(..., "-n", help="Number of queries."),
    shape: Optional[str] = typer.Option(None, "--shape", help="Image shape CxHxW, e.g. 1x28x28."),
    like: Optional[str] = typer.Option(None, "--like", help="Take the shape from a weights file."),
    dist: str = typer.Option("uniform", "--dist", help="uniform | gaussian"),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(256, "--batch-size"),
    output: str = Output,
    debug: bool = DebugOption,
):
    """Random images, uniform on [0,1] or gaussian (mean 0.5, sd 0.25) clipped to [0,1]."""
    s = _like_shape(like, shape)
    if s is None:
        raise KdUsageError("give --shape CxHxW or --like WEIGHTS")
    if n <= 0:
        raise KdUsageError("-n must be positive")
    options = {"method": "noise", "n": n, "shape": list(s), "dist": dist, "seed": seed}
    _write(noise_batches(s, n, batch_size, dist, seed), n, options, output)


@app.command()
def dataset(
    n: int = typer.Option(..., "-n", help="Number of queries (cycles through the data when larger than it)."),
    data: str = typer.Option(..., "--data", help="digits | mnist | fashion-mnist | cifar10 | cifar100 | svhn | folder:DIR | FILE"),
    split: str = typer.Option("train", "--split"),
    data_root_opt: Optional[str] = DataRootOption,
    download: bool = typer.Option(False, "--download", help="Download the dataset if missing (needs internet)."),
    like: Optional[str] = typer.Option(None, "--like", help="Resize / convert channels to fit this weights file's input."),
    image_size: Optional[int] = typer.Option(None, "--image-size"),
    channels: Optional[int] = typer.Option(None, "--channels"),
    augment: bool = typer.Option(False, "--augment", help="Random rotation/scale/shift of every image."),
    hflip: bool = typer.Option(False, "--hflip", help="Also mirror images when augmenting."),
    no_shuffle: bool = typer.Option(False, "--no-shuffle"),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(256, "--batch-size"),
    output: str = Output,
    debug: bool = DebugOption,
):
    """Images of a public dataset as queries (their labels are never used)."""
    if n <= 0:
        raise KdUsageError("-n must be positive")
    s = _like_shape(like, None)
    if s is not None:
        channels, image_size = channels or s[0], image_size or s[1]
    ds = load_dataset(data, split, data_root(data_root_opt), download, image_size, channels)
    options = {"method": "dataset", "data": data, "split": split, "n": n, "augment": augment, "hflip": hflip,
               "seed": seed, "shape": list(ds.shape)}
    _write(dataset_batches(ds, n, batch_size, not no_shuffle, augment, seed, hflip), n, options, output)


def _later(name: str, issue: int):
    @app.command(name, context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
    def _cmd(ctx: typer.Context):
        not_yet(f"kd-gen-queries {name}", issue, f"the {name} query generator")

    _cmd.__doc__ = f"(not yet: issue #{issue})"


for _name, _issue in (("tandemgan", 4), ("dfme", 4), ("ideal", 4), ("cake", 4), ("aedm", 6)):
    _later(_name, _issue)


def main() -> None:
    run_app(app, "kd-gen-queries")


if __name__ == "__main__":
    main()
