"""Predicted against measured peak, one point per validation case (README figure)."""

from __future__ import annotations


def plot_validation(df, path: str) -> None:
    """Log-log scatter of predicted vs measured peak bytes, coloured by architecture, with the
    y = x line and a +-5% band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 5.2))
    arch = df["model"].str.split("/").str[-1]
    gib = 2**30
    lo = min(df.predicted.min(), df.measured.min()) / gib / 1.3
    hi = max(df.predicted.max(), df.measured.max()) / gib * 1.3
    for name, g in df.assign(arch=arch).groupby("arch"):
        ax.scatter(g.measured / gib, g.predicted / gib, s=18, label=name)
        ax2.scatter(g.measured / gib, g.error_pct, s=18, label=name)
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
    ax.fill_between([lo, hi], [lo * 0.95, hi * 0.95], [lo * 1.05, hi * 1.05], color="grey", alpha=0.2, label="±5%")
    ax.set(xscale="log", yscale="log", xlabel="measured peak (GiB, MemTracker)", ylabel="predicted peak (GiB, plan)",
           title="plan estimate against a measured training step")
    ax2.axhspan(-5, 5, color="grey", alpha=0.2)
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set(xscale="log", xlabel="measured peak (GiB)", ylabel="error (%)", title=f"{len(df)} cases")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
