"""The compact tables printed at the end of a run (results.json holds every record)."""
from __future__ import annotations

import pandas as pd
from rich.table import Table

from bdexp.console import console


def print_frame(df: pd.DataFrame, title: str) -> None:
    """A DataFrame (index included) as a rich table."""
    flat = df.reset_index()
    table = Table(title=title, title_justify="left")
    for col in flat.columns:
        table.add_column(" ".join(map(str, col)).strip() if isinstance(col, tuple) else str(col))
    for _, row in flat.iterrows():
        table.add_row(*(("" if pd.isna(v) else f"{v:.3f}") if isinstance(v, float) else str(v) for v in row.tolist()))
    console.print(table)


def _pivot(df: pd.DataFrame, index: list[str], columns: list[str]) -> pd.DataFrame:
    return df.pivot_table(index=index, columns=columns, values="value", aggfunc="mean")


def print_summary(run: dict, metrics: list[dict]) -> None:
    lam = "" if run.get("lambda") is None else f" λ={run['lambda']}"
    console.print(
        f"[bold]{run['dataset']} · {run['model']} · {run['attack']} ({run.get('attack_mode') or '-'}) · "
        f"{run['train']}{lam} · seed {run['seed']} · "
        f"{run['device']} · {run['wall_s']:.1f}s · model {run['model_cache']}"
    )
    df = pd.DataFrame(metrics)
    for tag in ("defense", "analysis", "level", "N", "r", "pair", "prune_ratio"):
        if tag not in df:
            df[tag] = None
    plain = df[df["defense"].isna() & df["analysis"].isna()]
    print_frame(plain.set_index("metric")[["value"]].T.rename(index={"value": "test set"}).rename_axis("model"), "model")
    pools = df[df["metric"].eq("f1") & df["N"].notna()]
    if not pools.empty:
        print_frame(_pivot(pools.astype({"N": int}), ["defense", "level"], ["N", "r"]),
                    "detectors: F1 on the screening pools (columns N, r′)")
    dist = df[df["analysis"].eq("distances") & df["metric"].isin(["mmd2", "ed2", "swd1", "aro"])]
    if not dist.empty:
        short = {"malicious": "mal", "intra": "intra", "inter": "inter"}
        dist = dist.assign(column=dist["metric"] + " " + dist["pair"].map(short).fillna(""))
        print_frame(_pivot(dist, ["level"], ["column"]), "distances (malicious / intra / inter) and ARO")
    nc = df[df["defense"].eq("nc") & df["metric"].isin(["target_flagged", "target_anomaly_index", "infected_l1", "uninfected_l1"])]
    if not nc.empty:
        print_frame(nc.set_index("metric")[["value"]].T.rename(index={"value": "nc"}).rename_axis("defense"), "Neural Cleanse")
    curve = df[df["defense"].eq("nc") & df["prune_ratio"].notna()]
    if not curve.empty:
        print_frame(_pivot(curve, ["metric"], ["prune_ratio"]), "pruning curve (fraction of s3 channels)")
    skipped = df[df["metric"].isin(["skipped", "aro_skipped"])]
    if not skipped.empty:
        console.print(f"[yellow]{len(skipped)} item(s) skipped; see the log and results.json")
