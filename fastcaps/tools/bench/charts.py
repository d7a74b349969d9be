"""The charts of ``fastcaps bench``: speed-up and peak memory against batch size, and the
scaling sweeps. Each provider keeps its colour (fastcaps.backends for the backends)."""

from __future__ import annotations

from typing import Sequence

from ...backends import REGISTRY
from ..plotting import pyplot
from . import engine as bench

# torch.compile of the reference is a provider but not a backend: its colour is kept here.
_COMPILED_REFERENCE_COLOR = "#1f77b4"


def _color(provider: str) -> str:
    return REGISTRY[provider].color if provider in REGISTRY else _COMPILED_REFERENCE_COLOR


def _log_axis_with_ticks(axis, xs) -> None:
    """Log-2 x axis labelled with the measured values themselves; plain y tick labels."""
    from matplotlib.ticker import FixedLocator, LogLocator, NullFormatter, ScalarFormatter

    axis.set_xscale("log", base=2)
    axis.xaxis.set_major_locator(FixedLocator(xs))
    axis.xaxis.set_major_formatter(ScalarFormatter())
    axis.xaxis.set_minor_formatter(NullFormatter())
    if axis.get_yscale() == "log":
        axis.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.yaxis.set_major_formatter(ScalarFormatter())
    axis.yaxis.set_minor_formatter(NullFormatter())
    axis.grid(True, which="major", alpha=0.3)


def chart(path: str, records: Sequence[dict], title: str) -> None:
    """Speed-up over the reference (top) and peak memory (bottom) against batch size, one
    column per (case, mode, iterations)."""
    plt = pyplot()
    panels = sorted({(r["case"], r["mode"], r["iterations"]) for r in records},
                    key=lambda k: (k[0], bench.MODES.index(k[1]), k[2]))
    figure, axes = plt.subplots(2, len(panels), figsize=(4.8 * len(panels), 7.5), squeeze=False)
    for column, (case, mode, iterations) in enumerate(panels):
        chosen = [r for r in records if (r["case"], r["mode"], r["iterations"]) == (case, mode, iterations)]
        speed_axis, memory_axis = axes[0][column], axes[1][column]
        for provider in dict.fromkeys(r["provider"] for r in chosen):
            series = sorted((r for r in chosen if r["provider"] == provider), key=lambda r: r["batch"])
            batches = [r["batch"] for r in series]
            color = _color(provider)
            if series[0]["speedup"] is not None:
                speedups = [r["speedup"] for r in series]
                errors = [[s - r["speedup_low"] for s, r in zip(speedups, series)],
                          [r["speedup_high"] - s for s, r in zip(speedups, series)]]
                speed_axis.errorbar(batches, speedups, yerr=errors, marker="o", capsize=3, label=provider, color=color)
            if series[0]["peak_mib"] is not None:
                memory_axis.plot(batches, [r["peak_mib"] for r in series], marker="o", label=provider, color=color)
        speed_axis.set_title(f"{case} ({chosen[0]['shape']}), {mode}, r={iterations}", fontsize=10)
        speed_axis.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
        speed_axis.set_ylabel("speed-up over the reference (x)")
        memory_axis.set_ylabel("peak memory growth (MiB)")
        memory_axis.set_yscale("log")
        batches = sorted({r["batch"] for r in chosen})
        for axis in (speed_axis, memory_axis):
            _log_axis_with_ticks(axis, batches)
            axis.set_xlabel("batch size")
        speed_axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def scaling_chart(path: str, records: Sequence[dict], title: str) -> None:
    """Time (top) and peak memory (bottom) against B, I, J and r, one line per provider."""
    plt = pyplot()
    sweeps = [s for s in ("batch", "in_caps", "out_caps", "iterations") if any(r["sweep"] == s for r in records)]
    figure, axes = plt.subplots(2, len(sweeps), figsize=(4.6 * len(sweeps), 7.5), squeeze=False)
    for column, sweep in enumerate(sweeps):
        chosen = [r for r in records if r["sweep"] == sweep]
        for provider in dict.fromkeys(r["provider"] for r in chosen):
            series = sorted((r for r in chosen if r["provider"] == provider), key=lambda r: r["x"])
            xs = [r["x"] for r in series]
            color = _color(provider)
            axes[0][column].errorbar(xs, [r["median_ms"] for r in series],
                                     yerr=[[r["median_ms"] - r["q1_ms"] for r in series],
                                           [r["q3_ms"] - r["median_ms"] for r in series]],
                                     marker="o", capsize=3, label=provider, color=color)
            axes[1][column].plot(xs, [r["peak_mib"] for r in series], marker="o", label=provider, color=color)
        axes[0][column].set_title(f"varying {sweep} ({chosen[0]['fixed']})", fontsize=10)
        axes[0][column].set_ylabel("median time (ms)")
        axes[1][column].set_ylabel("peak memory growth (MiB)")
        xs = sorted({r["x"] for r in chosen})
        for axis in (axes[0][column], axes[1][column]):
            axis.set_yscale("log")
            _log_axis_with_ticks(axis, xs)
            axis.set_xlabel(sweep)
        axes[0][column].legend(fontsize=8)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
