"""kd-diffstep: single-fold step distillation of diffusion models (SFDDM). Added by issue #5."""

from __future__ import annotations

import typer

from ._common import make_app, not_yet, run_app

app = make_app("Shorten a diffusion teacher to any number of steps in one fold (SFDDM). Not yet: issue #5.")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def diffstep(ctx: typer.Context):
    """(not yet: issue #5)"""
    not_yet("kd-diffstep", 5, "diffusion step distillation")


def main() -> None:
    run_app(app, "kd-diffstep")


if __name__ == "__main__":
    main()
