"""The merged sweep as tidy Parquet tables, read back by pandas, polars and duckdb."""
import json

import duckdb
import numpy as np
import pandas as pd
import polars as pl

from sweep_fake import fake_sweep
from vgkernels.sweep.store import METRICS, load_results


def _fields(i):
    f = {"modality": ["CT", "MRI", "X-ray"][i % 3], "label": f"lesion {i % 2}", "image_id": 1000 + i,
         "score": [0.5, 2, 3.25, 1, 0.0][i], "is_normal": i % 2 == 0, "tags": ["a", str(i)]}
    if i == 3:
        del f["label"]  # a field some samples lack
        f["index"] = "clashes with a column"
    return f


def test_parquet_tables_match_the_arrays_in_pandas_polars_and_duckdb(tmp_path):
    out = tmp_path / "s"

    def holes(head, layer):
        head[2, 1, 0, 3] = np.nan
        layer[4, 5, 1] = np.inf

    fake_sweep(out, n=5, L=3, H=4, layers=[1, 4, 6], fields=_fields, edit=holes)
    from vgkernels.sweep.tables import BASE_COLUMNS

    meta, recs, head, layer = load_results(str(out))
    lp, hp = str(out / "layers.parquet"), str(out / "heads.parquet")

    df = pd.read_parquet(lp)
    assert len(df) == 5 * 3
    assert list(df.columns[: len(BASE_COLUMNS) - 1]) == [c for c in BASE_COLUMNS if c != "head"]
    assert {"modality", "label", "image_id", "score", "is_normal", "tags", "field_index"} <= set(df.columns)
    for _, r in df.iterrows():
        i, li = int(r["row"]), [1, 4, 6].index(int(r["layer"]))
        assert r["sid"] == recs[i]["sid"] and r["image"] == recs[i]["image"]
        for j, m in enumerate(METRICS):
            want = layer[i, j, li]
            assert (pd.isna(r[m]) and not np.isfinite(want)) or np.float32(r[m]) == want
        assert r["modality"] == recs[i]["fields"]["modality"] and r["model"] == "fake-model"
        assert (r["grid_h"], r["grid_w"], r["N"], r["mask"]) == (2, 2, 4, "bbox")
    assert df["image_id"].dtype.kind == "i" and df["score"].dtype.kind == "f" and df["is_normal"].dtype == bool
    assert df.loc[df.row == 3, "label"].isna().all() and (df.loc[df.row == 3, "field_index"] == "clashes with a "
                                                                                                 "column").all()
    assert json.loads(df.loc[0, "tags"]) == ["a", "0"]

    ph = pl.read_parquet(hp)
    assert ph.height == 5 * 3 * 4
    for r in ph.iter_rows(named=True):
        i, li, h = r["row"], [1, 4, 6].index(r["layer"]), r["head"]
        for j, m in enumerate(METRICS):
            want = head[i, j, li, h]
            assert (r[m] is None and not np.isfinite(want)) or np.float32(r[m]) == want
    assert ph.filter((pl.col("row") == 2) & (pl.col("layer") == 1) & (pl.col("head") == 3))["kl"].to_list() == [None]

    con = duckdb.connect()
    got = con.execute(f"SELECT layer, head, avg(kl_ref), count(*) FROM '{hp}' GROUP BY layer, head "
                      "ORDER BY layer, head").fetchall()
    assert len(got) == 12
    for (l, h, mean, n) in got:
        np.testing.assert_allclose(mean, head[:, 4, [1, 4, 6].index(l), h].astype(np.float64).mean(), rtol=1e-6)
        assert n == 5
    by_mod = con.execute(f"SELECT modality, count(DISTINCT sid) FROM '{lp}' GROUP BY modality ORDER BY 1").fetchall()
    assert by_mod == [("CT", 2), ("MRI", 2), ("X-ray", 1)]


def test_an_empty_sweep_still_writes_readable_tables(tmp_path):
    fake_sweep(tmp_path / "s", n=0)
    assert len(pd.read_parquet(tmp_path / "s" / "layers.parquet")) == 0
    assert pl.read_parquet(tmp_path / "s" / "heads.parquet").height == 0
