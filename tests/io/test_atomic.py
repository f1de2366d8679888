"""Atomic writes: temp names, and the sweep of temps left by killed writers (this host, dead processes only)."""

from __future__ import annotations

import os
import subprocess
import sys

from curate.io.atomic import HOST_TAG, TEMP_NAME, atomic_path, sweep_stale_temps, temp_path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has this pid until the kernel reuses it


def test_temp_names_match_the_sweep_pattern_and_carry_host_and_pid(tmp_path):
    name = temp_path(tmp_path / "table.parquet").name
    match = TEMP_NAME.match(name)
    assert match and match["host"] == HOST_TAG and int(match["pid"]) == os.getpid()
    assert name.startswith(".table.parquet.tmp-")


def test_sweep_removes_only_dead_writers_of_this_host(tmp_path):
    pid = dead_pid()
    dead_here = tmp_path / f".a.parquet.tmp-{HOST_TAG}-{pid}-0badf00d"
    alive_here = tmp_path / f".b.parquet.tmp-{HOST_TAG}-{os.getpid()}-0badf00d"
    other_host = tmp_path / f".c.parquet.tmp-{'0' * 8 if HOST_TAG != '0' * 8 else '1' * 8}-{pid}-0badf00d"
    not_ours = [tmp_path / ".d.parquet.tmp-123-deadbeef", tmp_path / "e.parquet", tmp_path / f"f.tmp-{HOST_TAG}-{pid}-0badf00d"]
    for path in [dead_here, alive_here, other_host, *not_ours]:
        path.write_bytes(b"partial")
    assert sweep_stale_temps(tmp_path, tmp_path / "missing") == 1
    assert not dead_here.exists()
    assert alive_here.exists() and other_host.exists() and all(p.exists() for p in not_ours)


def test_a_failed_write_leaves_nothing_and_a_good_one_renames(tmp_path):
    target = tmp_path / "x.bin"
    try:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer failed")
    except RuntimeError:
        pass
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [target]


def test_stages_sweep_the_temps_a_killed_run_left(tmp_path):
    """A rerun of score (table, caches, negclip parts) and export removes the temps of dead writers here."""
    import pyarrow.parquet as pq

    from conftest import make_embedding_dir
    from curate.io.uids import write_uid_npy
    from conftest import run_export, run_score
    from shard_builders import make_shard, sample, uid_of

    pid = dead_pid()

    def plant(directory):
        directory.mkdir(parents=True, exist_ok=True)
        stale = directory / f".something.tmp-{HOST_TAG}-{pid}-0badf00d"
        stale.write_bytes(b"what a kill -9 mid-write leaves")
        return stale

    emb = make_embedding_dir(tmp_path / "emb", [20, 15], dim=8, seed=1)
    out = tmp_path / "scores" / "s.parquet"
    stale = [plant(out.parent), plant(out.parent / ".curate-cache")]
    parts = out.parent / "s.parquet.parts"
    for rank in range(2):  # map/reduce parts, kept by a rank split
        run_score(emb, out, metrics="clipscore,negclip", k=2, batch_size=8, device="cpu", tasks=3, rank=rank, world_size=2)
    assert pq.read_table(out).num_rows == 35
    part_dirs = [d for d in parts.iterdir() if d.is_dir()]
    stale += [plant(part_dirs[0]), plant(part_dirs[0] / "_markers" / "negclip")]
    run_score(emb, out, metrics="clipscore,negclip", k=2, batch_size=8, device="cpu", tasks=3, rank=0, world_size=2)
    assert part_dirs[0].is_dir() and not [s for s in stale if s.exists()]

    (tmp_path / "shards").mkdir()
    make_shard(tmp_path / "shards" / "00000.tar", [sample(f"k{i}", i) for i in range(5)])
    write_uid_npy([uid_of(i) for i in range(3)], tmp_path / "subset" / "uids.npy")
    left = plant(tmp_path / "exported")
    report = run_export(str(tmp_path / "shards"), tmp_path / "subset", tmp_path / "exported", shard_size=2)
    assert report.written == 3 and not left.exists()
