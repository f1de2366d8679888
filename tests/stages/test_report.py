"""`curate report`: every section present, nothing external, captions escaped, numbers from the run; and
the page opened in a real headless Chromium (every image decodes, no network request)."""

from __future__ import annotations

import fcntl
import html
import io
import json
import os
import select
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import markupsafe
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from curate.errors import CurateError
from curate.io.shards import decode_sample, expand_shards, iter_shard
from curate.io.tables import TeacherInfo, build_embedding_table, write_table_atomic
from curate.io.uids import read_uid_npy
from curate.io.tar_blocks import write_tar_atomic
from curate.stages.report import ReportConfig
from curate.stages.synth import TRUTH_KINDS
from curate.stages.report.entry import run as report_run
from conftest import run_filter, synth_corpus

SECTIONS = ("overview", "histograms", "scatter", "removal", "galleries", "compare", "curves", "parameters")
EVIL_UID = "e" * 32
EVIL_CAPTION = '<script>alert("x")</script><img src="https://evil.example/pixel.png"> & friends'
TEACHER = TeacherInfo(model="test", pretrained="none", embed_dim=8, logit_scale=100.0)


# ---------------------------------------------------------------- a small run directory

def make_run_dir(root: Path, samples: int = 60, seed: int = 0, full: bool = True) -> Path:
    """A RUN_DIR like `curate run` writes: a synth corpus (plus one sample with a hostile caption), embedding
    tables carrying the truth json, score tables whose scores depend on the truth, two real filter subsets,
    and (when `full`) compare output, two training curves and run.json."""
    run = root / "run"
    synth_corpus(run / "corpus", samples=samples, shard_size=samples // 2, seed=seed, corrupt=0.3,
                target_samples=0, image_size=32)
    jpeg = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(jpeg, format="JPEG")
    evil_json = json.dumps({"uid": EVIL_UID, "truth": "swapped"}).encode()
    write_tar_atomic(run / "corpus" / "00099.tar",
                     [("evil", {"jpg": jpeg.getvalue(), "txt": EVIL_CAPTION.encode(), "json": evil_json})])

    decoded = [decode_sample(raw) for url in expand_shards(str(run / "corpus"))
               for raw in iter_shard(url, lambda key, reason: None)]
    rng = np.random.default_rng(seed)
    n = len(decoded)
    unit = rng.standard_normal((2, n, TEACHER.embed_dim)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=2, keepdims=True)
    table = build_embedding_table([d.uid for d in decoded], [d.key for d in decoded], [d.caption for d in decoded],
                                  unit[0], unit[1], json_texts=[d.json_text for d in decoded])
    write_table_atomic(table, run / "emb" / "00000.parquet", meta={"teacher": TEACHER.to_dict()})

    truth = np.array([d.meta.get("truth") for d in decoded])
    clipscore = np.where(truth == "clean", 0.30, 0.20) + 0.04 * rng.standard_normal(n)
    negclip = clipscore - 0.1 + 0.02 * rng.standard_normal(n)
    uids = pa.array([d.uid for d in decoded], pa.string())
    write_table_atomic(pa.table({"uid": uids, "clipscore": clipscore.astype(np.float32),
                                 "negclip": negclip.astype(np.float32)}),
                       run / "scores.parquet", meta={"stage": "score", "teacher": TEACHER.to_dict(),
                                                     "params": {"k": 2, "batch_size": 16, "seed": seed}})
    write_table_atomic(pa.table({"uid": uids, "normsim_inf": rng.random(n).astype(np.float32),
                                 "normsim_2": rng.random(n).astype(np.float32)}),
                       run / "normsim.parquet", meta={"stage": "normsim", "teacher": TEACHER.to_dict()})
    run_filter([run / "scores.parquet"], run / "subsets" / "clipscore", keep=["clipscore:0.3"])
    run_filter([run / "scores.parquet", run / "normsim.parquet"], run / "subsets" / "negclip_normsim",
                keep=["negclip:0.3", "normsim_inf:0.2"])
    if full:
        (run / "compare").mkdir()
        (run / "compare" / "compare.md").write_text(
            "# Comparison\n\nfraction 0.3, 2 seeds\n\n| method | zero-shot top-1 | R@1 |\n|---|---:|---:|\n"
            "| random | 0.41 ± 0.02 | 0.10 ± 0.01 |\n| negclip | 0.47 ± 0.01 | 0.13 ± 0.01 |\n")
        (run / "compare" / "compare.json").write_text(json.dumps({"methods": {"random": {"zero_shot": [0.4, 0.42]}}}))
        for name, slope in (("negclip", 0.9), ("random", 0.95)):
            history = [{"step": s, "loss": 4.0 * slope ** s, "lr": 1e-3} for s in range(0, 50, 5)]
            (run / "students" / name).mkdir(parents=True)
            (run / "students" / name / "history.json").write_text(json.dumps(history))
        (run / "run.json").write_text(json.dumps({"recipe": "test", "synth": {"samples": samples, "seed": seed},
                                                  "filter": {"keep": ["negclip:0.3", "normsim_inf:0.2"]}}))
    return run


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One run directory and its report (per_decile large enough that every sample is in a gallery)."""
    root = tmp_path_factory.mktemp("report")
    run = make_run_dir(root)
    result = report_run(run, root / "report.html", ReportConfig(per_decile=100))
    return run, Path(result.out), result


class PageParser(HTMLParser):
    """Collects section ids, every URL-bearing attribute, <img> sources, gallery cards and table cells."""

    URL_ATTRS = {"src", "href", "srcset", "action", "formaction", "poster", "data", "background", "xlink:href"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.sections, self.urls, self.images, self.cards, self.tags = [], [], [], [], []
        self.caption_texts, self.caption_titles = [], []
        self.caption: list[str] | None = None
        self.section = self.subset = self.side = None
        self.rows: dict[str, list[list[str]]] = {}
        self.cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        self.urls += [(tag, k, v or "") for k, v in attrs if k in self.URL_ATTRS]
        if tag == "section":
            self.section = a.get("id")
            self.sections.append(self.section)
        elif tag == "img":
            self.images.append(a.get("src", ""))
        elif tag == "details":
            self.subset = a.get("data-subset")
        elif tag == "td":
            self.side = a.get("data-side")
            self.cell = []
        elif tag == "div" and "data-uid" in a:
            self.cards.append((self.subset, self.side, a["data-uid"]))
        elif tag == "div" and a.get("class") == "cap":
            self.caption_titles.append(a.get("title"))
            self.caption = []
        elif tag == "tr":
            self.rows.setdefault(self.section, []).append([])

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)
        if self.caption is not None:
            self.caption.append(data)

    def handle_endtag(self, tag):
        if tag == "div" and self.caption is not None:
            self.caption_texts.append("".join(self.caption))
            self.caption = None
        if tag == "td" and self.cell is not None:
            self.rows[self.section][-1].append(" ".join("".join(self.cell).split()))
            self.cell = None


def parse(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    return parser


# ---------------------------------------------------------------- content

def test_report_has_every_section_with_content(built):
    run, out, result = built
    page = out.read_text(encoding="utf-8")
    p = parse(page)
    assert p.sections == list(SECTIONS)
    assert 'class="absent"' not in page  # every input is present, so no section says it is missing
    assert set(result.sections) == set(SECTIONS) - {"overview"}
    # histograms of the four metrics with the subsets' cut scores, one scatter, removal, curves: 7 plots
    plots = [src for src in p.images if src.startswith("data:image/png;base64,")]
    assert len(plots) == 4 + 1 + 1 + 1
    for metric in ("clipscore", "negclip", "normsim_inf", "normsim_2"):
        assert f'alt="histogram of {metric}"' in page
    stats = json.loads((run / "subsets" / "negclip_normsim" / "stats.json").read_text())
    for step in stats["steps"]:
        assert f"keep {step['metric']}:{step['fraction']} cuts at {step['threshold']:.4g}" in page
    # compare table rendered from the Markdown, run parameters flattened from run.json
    assert ["negclip", "0.47 ± 0.01", "0.13 ± 0.01"] in p.rows["compare"]
    assert ["filter.keep", '["negclip:0.3", "normsim_inf:0.2"]'] in p.rows["parameters"]
    assert ["synth.samples", "60"] in p.rows["parameters"]
    assert ["students/negclip", "45", "%.4g" % (4.0 * 0.9 ** 45)] in p.rows["curves"]


def test_no_external_url_and_captions_escaped(built):
    _, out, _ = built
    page = out.read_text(encoding="utf-8")
    p = parse(page)
    assert p.urls, "the page has images and anchors"
    for tag, attr, value in p.urls:
        assert value.startswith(("data:image/png;base64,", "data:image/jpeg;base64,", "#")), (tag, attr, value[:80])
    assert "url(" not in page and "@import" not in page
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert "default-src 'none'; img-src data:" in html.unescape(page)
    # the hostile caption is shown as text (card caption and its title attribute, once per subset), never as markup
    assert p.tags.count("script") == 0 and p.images.count("https://evil.example/pixel.png") == 0
    assert p.caption_texts.count(EVIL_CAPTION) == 2 and p.caption_titles.count(EVIL_CAPTION) == 2
    escaped = str(markupsafe.escape(EVIL_CAPTION))
    assert page.count(escaped) == 4
    rest = page.replace(escaped, "")
    assert "http://" not in rest and "https://" not in rest
    assert any(uid == EVIL_UID for subset, _, uid in p.cards if subset == "negclip_normsim")


def test_galleries_and_removal_table_agree_with_the_subsets(built):
    run, out, _ = built
    p = parse(out.read_text(encoding="utf-8"))
    corpus_truth = {}
    for url in expand_shards(str(run / "corpus")):
        for raw in iter_shard(url, lambda key, reason: None):
            d = decode_sample(raw)
            corpus_truth[d.uid] = d.meta["truth"]
    kinds = [kind for kind in TRUTH_KINDS if kind in set(corpus_truth.values())]  # the page's columns, in order
    assert "partial_mismatch" in kinds and "semantic_twin" in kinds
    for name in ("clipscore", "negclip_normsim"):
        kept = set(read_uid_npy(run / "subsets" / name / "uids.npy"))
        cards = [(side, uid) for subset, side, uid in p.cards if subset == name]
        # per_decile=100: every pool sample appears once, on the side the subset put it
        assert sorted(uid for _, uid in cards) == sorted(corpus_truth)
        assert all((side == "kept") == (uid in kept) for side, uid in cards)
        expected = [name, f"{len(kept)} / {len(corpus_truth)}"]
        for kind in kinds:
            members = [u for u, t in corpus_truth.items() if t == kind]
            expected.append("%.1f %%" % (100 * sum(u not in kept for u in members) / len(members)))
        assert expected in p.rows["removal"]


def test_missing_inputs_are_noted_not_fatal(tmp_path):
    run = make_run_dir(tmp_path, samples=20, full=False)
    shutil.rmtree(run / "subsets")
    shutil.rmtree(run / "emb")
    result = report_run(run, tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert parse(page).sections == list(SECTIONS)
    assert set(result.sections) == {"parameters", "histograms", "scatter"}
    for looked_for in ("RUN_DIR/subsets/", "RUN_DIR/compare/compare.md", "RUN_DIR/run.json", "RUN_DIR/emb/",
                       "RUN_DIR/students/"):
        assert looked_for in page
    with pytest.raises(CurateError, match="nothing to report"):
        report_run(_empty_dir(tmp_path), tmp_path / "x.html")
    with pytest.raises(CurateError, match="no such run directory"):
        report_run(tmp_path / "absent", tmp_path / "y.html")


def test_explicit_scores_and_subset_options(built, tmp_path):
    run, _, _ = built
    result = report_run(run, tmp_path / "r.html", ReportConfig(per_decile=1), scores=[run / "scores.parquet"],
                        subsets=[run / "subsets" / "clipscore"])
    p = parse((tmp_path / "r.html").read_text(encoding="utf-8"))
    plots = [src for src in p.images if src.startswith("data:image/png")]
    assert len(plots) == 2 + 1 + 1 + 1  # clipscore and negclip histograms, scatter, removal, curves
    assert {subset for subset, _, _ in p.cards} == {"clipscore"}
    assert len(p.cards) <= 2 * 10  # one kept and one removed per decile at most
    assert "removal" in result.sections
    with pytest.raises(CurateError, match="--subset"):
        report_run(run, tmp_path / "x.html", subsets=[run / "nothing"])


def _empty_dir(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def test_same_inputs_same_bytes_and_cli(built, tmp_path):
    from typer.testing import CliRunner

    from curate.cli import app

    run, out, _ = built
    again = tmp_path / "again.html"
    res = CliRunner().invoke(app, ["report", str(run), "--out", str(again), "--per-decile", "100"])
    assert res.exit_code == 0, res.output
    assert again.read_bytes() == out.read_bytes()


# ---------------------------------------------------------------- a real browser

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    return next((path for path in map(shutil.which, CHROMIUM_CANDIDATES) if path), None)


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: the browser
    reads NUL-terminated JSON on fd 3 and writes on fd 4), so no port, websocket or extra package is needed."""

    def __init__(self, binary: str, profile: Path, timeout: float = 60.0):
        self.timeout = timeout
        to_browser_r, self.to_browser = os.pipe()
        self.from_browser, from_browser_w = os.pipe()
        # move the child's ends above 9 so that the shell's 3<&N 4>&M cannot clobber one with the other
        # (bash, not sh: dash refuses file descriptors above 9 in redirections)
        child_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_browser_r)
        os.close(from_browser_w)
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", f"--user-data-dir={profile}",
                "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-default-apps", "--mute-audio",
                "about:blank"]
        self.proc = subprocess.Popen(["bash", "-c", f'exec "$0" "$@" 3<&{child_r} 4>&{child_w}', binary, *args],
                                     pass_fds=(child_r, child_w), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(child_r)
        os.close(child_w)
        self.buffer, self.next_id, self.events = b"", 0, []

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.to_browser, json.dumps(message).encode() + b"\0")
        reply = self.wait(lambda m: m.get("id") == message["id"])
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait(self, predicate) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "method" in message:
                    self.events.append(message)
                if predicate(message):
                    return message
            ready, _, _ = select.select([self.from_browser], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("no answer from Chromium")
            chunk = os.read(self.from_browser, 1 << 16)
            if not chunk:
                raise EOFError(f"Chromium exited: {self.proc.stderr.read().decode(errors='replace')[-2000:]}")
            self.buffer += chunk

    def open(self, path: Path) -> dict:
        """Load a file in a fresh tab; return its images' decode state and every URL the page requested."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Network.enable", "Page.enable", "Runtime.enable"):
            self.send(domain, session=session)
        first_event = len(self.events)
        self.send("Page.navigate", {"url": path.resolve().as_uri()}, session=session)
        self.wait(lambda m: m.get("method") == "Page.loadEventFired" and m.get("sessionId") == session)
        images = self.send("Runtime.evaluate", {"returnByValue": True, "expression": (
            "Array.from(document.images).map(i => ({complete: i.complete, width: i.naturalWidth, "
            "height: i.naturalHeight, src: i.src.slice(0, 40)}))")}, session=session)["result"]["value"]
        resources = self.send("Runtime.evaluate", {"returnByValue": True, "expression": (
            "performance.getEntriesByType('resource').map(e => e.name)")}, session=session)["result"]["value"]
        requests = [e["params"]["request"]["url"] for e in self.events[first_event:]
                    if e.get("method") == "Network.requestWillBeSent" and e.get("sessionId") == session]
        self.send("Target.closeTarget", {"targetId": target})
        return {"images": images, "requests": requests, "resources": resources}

    def close(self):
        try:
            self.send("Browser.close")
            self.proc.wait(timeout=15)
        except (OSError, EOFError, TimeoutError, RuntimeError):
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self.to_browser)
            os.close(self.from_browser)
            self.proc.stderr.close()


def fetched_elsewhere(result: dict, page: Path) -> list[str]:
    """URLs the page fetched other than itself and inline data: URIs."""
    own = page.resolve().as_uri()
    return [u for u in result["requests"] + result["resources"] if u != own and not u.startswith("data:")]


def test_report_in_headless_chromium(built, tmp_path):
    binary = find_chromium()
    if binary is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it when root); "
                    "the browser check of the report cannot run")
    _, out, _ = built
    expected_images = len(parse(out.read_text(encoding="utf-8")).images)
    # a control page the checks must fail on: one broken image, one image from the network
    control = tmp_path / "control.html"
    control.write_text('<!DOCTYPE html><meta charset="utf-8"><img src="data:image/png;base64,AAAA">'
                       '<img src="http://127.0.0.1:9/pixel.png">', encoding="utf-8")
    browser = Chromium(binary, tmp_path / "profile")
    try:
        report = browser.open(out)
        checked = browser.open(control)
    finally:
        browser.close()

    assert len(report["images"]) == expected_images > 100
    undecoded = [i for i in report["images"] if not (i["complete"] and i["width"] > 0 and i["height"] > 0)]
    assert not undecoded, undecoded[:5]
    assert report["requests"] and report["requests"][0] == out.resolve().as_uri()
    assert fetched_elsewhere(report, out) == []

    assert [i["width"] for i in checked["images"]] == [0, 0]
    assert "http://127.0.0.1:9/pixel.png" in fetched_elsewhere(checked, control)
