"""Incremental runs: a row whose work is already at the output location is skipped, by the
producer (local files, data URIs) or by its worker (URL and s3:// sources), with no
provider request. Real Submitter, real pipeline, real Redis, real local storage and moto's
S3 server, and the strict fake Runware's own record of what it was asked."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib

from batching import bgswap, clean_env, png
from producer import runner
from producer.batch import SubmitOptions, SubmitReport, Submitter, estimate, output_root
from producer.manifest import RowDefaults, read_manifest
from producer.staging import Stager, needs_staging
from servers.files import FileServer
from servers.runware import FakeRunware
from servers.s3 import MotoS3, moto_s3
from worker.fingerprint import index_location
from worker.pipeline import Deps, finalize, handle_delivery
from worker.providers import get_provider
from worker.runtime import build_deps
from worker.settings import Settings

KEY = "rw-incremental-key"


@pytest.fixture
def files() -> Iterator[FileServer]:
    with FileServer() as server:
        yield server


@pytest.fixture
def fake() -> Iterator[FakeRunware]:
    with FakeRunware(KEY, processing_s=0.0) as server:
        yield server


@pytest.fixture
def s3() -> Iterator[MotoS3]:
    with moto_s3() as server:
        yield server


@pytest.fixture
def catalog(
    redis_url: str, redis_client: redis_lib.Redis, tmp_path: Path, fake: FakeRunware
) -> Catalog:
    return Catalog(redis_url, tmp_path / "m", fake)


class Catalog:
    """A manifest folder, and batches of it submitted and run through the real core."""

    def __init__(self, redis_url: str, folder: Path, fake: FakeRunware, **overrides: Any) -> None:
        self.folder = folder
        self.settings = Settings(
            redis_url=redis_url,
            runware_api_key=KEY,
            runware_api_url=fake.url,
            runware_poll_initial_s=0.02,
            runware_poll_max_s=0.05,
            allow_private_urls=True,
            **overrides,
        )
        self.deps: Deps = build_deps(self.settings, lambda batch_id: None)
        self.fake = fake
        folder.mkdir(parents=True, exist_ok=True)

    def image(self, name: str, seed: int = 1, kind: str = "box") -> str:
        (self.folder / name).write_bytes(png(kind, seed))
        return name

    def run(
        self, csv_text: str, out: str | Path, bid: str, *, force: bool = False
    ) -> tuple[SubmitReport, list[dict[str, Any]]]:
        """Submit (with the index lookups `bgswap submit` does), deliver every row, write
        the output manifest; the report and the manifest's lines."""
        settings, deps = self.settings, self.deps
        root = output_root(str(out))
        providers = lambda name: get_provider(name, settings)  # noqa: E731
        skipper = runner.skipper_for(
            settings, root, force=force, storage=deps.storage, providers=providers
        )
        stage = Stager(deps.storage, root, settings) if needs_staging(root) else None
        submitter = Submitter(deps.store, lambda messages: None, providers, stage, skipper)
        defaults = RowDefaults(
            provider="runware",
            available_providers=frozenset({"runware", "local"}),
            base_dir=self.folder,
            allow_private_urls=True,
            output_prefixes=(root,) if root.startswith("s3://") else (),
            destination_root=f"{root}/{bid}",
        )
        rows = read_manifest(io.BytesIO(csv_text.encode()), "csv", defaults)
        report = submitter.submit(rows, SubmitOptions(bid, root, defaults, force=force))
        self._deliver(bid)
        url = finalize(bid, deps)
        assert url is not None
        return report, [json.loads(x) for x in self._read(url).splitlines()]

    def _deliver(self, bid: str) -> None:
        deadline = time.monotonic() + 60
        while self.deps.store.counts(bid)["queued"] and time.monotonic() < deadline:
            for index in sorted(self.deps.store.indices_in_state(bid, "queued")):
                handle_delivery(bid, index, self.deps)
            time.sleep(0.02)
        assert self.deps.store.counts(bid)["queued"] == 0

    def _read(self, url: str) -> str:
        data = self.deps.storage.read_small(url, 10**7)
        assert data is not None
        return data.decode()

    def requests(self) -> int:
        return len(self.fake.requests)


def statuses(lines: list[dict[str, Any]]) -> list[str]:
    return [x["status"] for x in lines]


def csv(*rows: str) -> str:
    return "id,image,prompt,rendering_speed\n" + "".join(r + "\n" for r in rows)


def test_a_second_run_of_an_unchanged_manifest_skips_every_row_without_a_request(
    catalog: Catalog, tmp_path: Path, fake: FakeRunware, files: FileServer
) -> None:
    cat = catalog
    url = files.add("/s.png", png("bottle", 2), "image/png")
    data_uri = "data:image/png;base64," + base64.b64encode(png("mug", 3)).decode()
    manifest = csv(
        f"a,{cat.image('a.png')},a marble counter,TURBO",
        f"b,{cat.image('b.png', 2)},a sunlit picnic,",
        f'c,"{data_uri}",a boutique window,',
        f"d,{url},a riverside,QUALITY",
    )
    first_report, first = cat.run(manifest, tmp_path / "out", "n1")
    assert statuses(first) == ["succeeded"] * 4 and first_report.skipped == 0
    paid, asked = len(fake.paid), cat.requests()
    assert paid == 4

    report, second = cat.run(manifest, tmp_path / "out", "n2")
    assert cat.requests() == asked and len(fake.paid) == paid  # not one request
    assert statuses(second) == ["skipped"] * 4
    assert report.skipped == 3  # a, b, c by the producer; d (a URL) by its worker
    assert report.estimated_cost_usd == pytest.approx(0.09)  # d's estimate: not known yet
    for old, new in zip(first, second, strict=True):
        assert new["outputs"] == old["outputs"] and new["cost_usd"] == 0.0
        assert new["error"] is None and new["model"] == old["model"] == "ideogram:4@5"
        assert all(o["url"].startswith(str(tmp_path / "out" / "n1")) for o in new["outputs"])
    assert [x["attempts"] for x in second] == [0, 0, 0, 1]


def test_a_changed_image_prompt_or_option_re_runs_only_that_row(
    catalog: Catalog, tmp_path: Path, fake: FakeRunware
) -> None:
    cat = catalog
    rows = [f"r{n},{cat.image(f'r{n}.png', n)},prompt {n},TURBO" for n in range(5)]
    cat.run(csv(*rows), tmp_path / "out", "c1")
    assert len(fake.paid) == 5
    cat.image("r1.png", 99)  # new bytes under the same name
    rows[2] = "r2,r2.png,another prompt,TURBO"
    rows[3] = "r3,r3.png,prompt 3,QUALITY"
    report, lines = cat.run(csv(*rows), tmp_path / "out", "c2")
    assert statuses(lines) == ["skipped", "succeeded", "succeeded", "succeeded", "skipped"]
    assert len(fake.paid) == 8 and report.skipped == 2
    assert lines[1]["outputs"][0]["url"].startswith(str(tmp_path / "out" / "c2"))
    # and a third run finds the re-run rows under their new fingerprints
    _, third = cat.run(csv(*rows), tmp_path / "out", "c3")
    assert statuses(third) == ["skipped"] * 5 and len(fake.paid) == 8
    assert third[1]["outputs"] == lines[1]["outputs"]


def test_force_re_runs_every_row_and_the_index_then_names_the_new_objects(
    catalog: Catalog, tmp_path: Path, fake: FakeRunware
) -> None:
    cat = catalog
    manifest = csv(*(f"r{n},{cat.image(f'r{n}.png', n)},p,TURBO" for n in range(3)))
    cat.run(manifest, tmp_path / "out", "f1")
    report, forced = cat.run(manifest, tmp_path / "out", "f2", force=True)
    assert statuses(forced) == ["succeeded"] * 3 and len(fake.paid) == 6
    assert report.skipped == 0 and cat.deps.store.meta("f2")["force"] == "1"
    _, after = cat.run(manifest, tmp_path / "out", "f3")
    assert statuses(after) == ["skipped"] * 3 and len(fake.paid) == 6
    assert [x["outputs"] for x in after] == [x["outputs"] for x in forced]


def test_a_row_whose_output_object_was_deleted_runs_again(
    catalog: Catalog, tmp_path: Path, fake: FakeRunware
) -> None:
    cat = catalog
    manifest = csv(*(f"r{n},{cat.image(f'r{n}.png', n)},p,TURBO" for n in range(3)))
    _, first = cat.run(manifest, tmp_path / "out", "d1")
    Path(first[1]["outputs"][0]["url"]).unlink()
    Path(first[2]["outputs"][0]["url"]).write_bytes(b"truncated")  # changed under us
    _, second = cat.run(manifest, tmp_path / "out", "d2")
    assert statuses(second) == ["skipped", "succeeded", "succeeded"]
    assert len(fake.paid) == 5


def test_skipping_does_not_leak_across_output_locations(
    catalog: Catalog, tmp_path: Path, fake: FakeRunware
) -> None:
    cat = catalog
    manifest = csv(*(f"r{n},{cat.image(f'r{n}.png', n)},p,TURBO" for n in range(2)))
    cat.run(manifest, tmp_path / "out-a", "l1")
    _, other = cat.run(manifest, tmp_path / "out-b", "l2")
    assert statuses(other) == ["succeeded"] * 2 and len(fake.paid) == 4
    assert all(o["url"].startswith(str(tmp_path / "out-b")) for x in other for o in x["outputs"])
    _, again = cat.run(manifest, tmp_path / "out-a", "l3")
    assert statuses(again) == ["skipped"] * 2 and len(fake.paid) == 4


def test_a_url_source_row_is_skipped_by_its_worker_and_a_changed_url_image_runs(
    catalog: Catalog, tmp_path: Path, fake: FakeRunware, files: FileServer
) -> None:
    cat = catalog
    url = files.add("/p.png", png("bottle", 1), "image/png")
    manifest = csv(f"u,{url},a riverside,TURBO")
    cat.run(manifest, tmp_path / "out", "u1")
    report, second = cat.run(manifest, tmp_path / "out", "u2")
    # the producer cannot read a URL cheaply: its worker fetched it and found the work done
    assert report.skipped == 0 and statuses(second) == ["skipped"] and len(fake.paid) == 1
    job = json.loads(cat.deps.store.job("u2", 0) or "{}")
    assert job["fingerprint"] is None
    files.add("/p.png", png("bottle", 7), "image/png")  # the same URL, another image
    _, third = cat.run(manifest, tmp_path / "out", "u3")
    assert statuses(third) == ["succeeded"] and len(fake.paid) == 2


def test_presigned_outputs_are_never_indexed_nor_skipped(
    catalog: Catalog, tmp_path: Path, fake: FakeRunware, files: FileServer
) -> None:
    cat = catalog
    put = files.url("/upload/a.jpg") + "?X-Amz-Signature=secret"
    files.add("/upload/a.jpg", b"", "image/jpeg")
    manifest = f"id,image,prompt,output\na,{cat.image('a.png')},p,{put}\n"
    cat.run(manifest, tmp_path / "out", "p1")
    _, second = cat.run(manifest, tmp_path / "out", "p2")
    assert statuses(second) == ["succeeded"] and len(fake.paid) == 2
    assert not (tmp_path / "out" / "_index").exists()


def test_an_s3_output_root_indexes_in_the_bucket_and_skips_staged_and_s3_sources(
    redis_url: str, redis_client: redis_lib.Redis, tmp_path: Path, fake: FakeRunware, s3: MotoS3
) -> None:
    cat = Catalog(redis_url, tmp_path / "m", fake, s3_endpoint_url=s3.endpoint_url)
    s3.client.put_object(Bucket=s3.bucket, Key="raw/src.png", Body=png("ring", 4))
    ref = cat.image("ref.png", 9, "mug")
    manifest = (
        "id,image,prompt,style_reference_images\n"
        f"a,{cat.image('a.png')},a marble counter,{ref}\n"
        f"b,s3://{s3.bucket}/raw/src.png,a picnic,\n"
    )
    root = f"s3://{s3.bucket}/out"
    _, first = cat.run(manifest, root, "s1")
    assert statuses(first) == ["succeeded"] * 2 and len(fake.paid) == 2
    listed = s3.client.list_objects_v2(Bucket=s3.bucket, Prefix="out/_index/")
    assert listed["KeyCount"] == 2
    asked = cat.requests()
    report, second = cat.run(manifest, root, "s2")
    assert statuses(second) == ["skipped"] * 2 and cat.requests() == asked
    assert report.skipped == 1  # the local file: by the producer, nothing staged for s2
    assert "Contents" not in s3.client.list_objects_v2(Bucket=s3.bucket, Prefix="out/s2/_sources")
    assert [x["outputs"] for x in second] == [x["outputs"] for x in first]
    # an entry names the objects, never a presigned URL or a key
    entry_key = index_location("out", _fp(cat, "s1", 0))
    body = s3.client.get_object(Bucket=s3.bucket, Key=entry_key)["Body"].read().decode()
    assert "X-Amz" not in body and KEY not in body
    s3.client.delete_object(Bucket=s3.bucket, Key=first[1]["outputs"][0]["key"])
    _, third = cat.run(manifest, root, "s3")
    assert statuses(third) == ["skipped", "succeeded"] and len(fake.paid) == 3


def _fp(cat: Catalog, bid: str, index: int) -> str:
    result = json.loads(cat.deps.store.redis.hget(f"bgswap:{{{bid}}}:result", str(index)))
    fingerprint: str = result["fingerprint"]
    return fingerprint


def test_validate_counts_the_rows_it_would_skip_and_the_cost_of_the_rest(
    catalog: Catalog, tmp_path: Path
) -> None:
    cat = catalog
    rows = [f"r{n},{cat.image(f'r{n}.png', n)},p,QUALITY" for n in range(4)]
    cat.run(csv(*rows[:3]), tmp_path / "out", "v1")
    root = output_root(str(tmp_path / "out"))
    defaults = RowDefaults(provider="runware", available_providers=frozenset({"runware"}),
                           base_dir=cat.folder)  # fmt: skip
    providers = lambda name: get_provider(name, cat.settings)  # noqa: E731

    def check(force: bool) -> SubmitReport:
        rows_in = read_manifest(io.BytesIO(csv(*rows).encode()), "csv", defaults)
        return estimate(rows_in, providers, runner.skipper_for(cat.settings, root, force=force))

    report = check(force=False)
    assert (report.valid, report.skipped) == (4, 3)
    assert report.estimated_cost_usd == pytest.approx(0.09)  # one QUALITY image
    forced = check(force=True)
    assert forced.skipped == 0 and forced.estimated_cost_usd == pytest.approx(0.36)
    empty = runner.skipper_for(cat.settings, output_root(str(tmp_path / "nothing-here")))
    assert empty is None  # nothing indexed there: no lookups at all


@pytest.mark.slow
def test_bgswap_run_twice_the_second_run_skips_everything_and_exits_0(
    tmp_path: Path, files: FileServer
) -> None:
    url = files.add("/u.png", png("bottle", 5), "image/png")
    for n in range(3):
        (tmp_path / f"r{n}.png").write_bytes(png("box", n))
    rows = [f"r{n},r{n}.png,prompt {n},TURBO" for n in range(3)] + [f"u,{url},a url,QUALITY"]
    (tmp_path / "m.csv").write_text(csv(*rows))
    with FakeRunware(KEY, processing_s=0.05) as fake:
        env = clean_env(
            RUNWARE_API_KEY=KEY, RUNWARE_API_URL=fake.url, BGSWAP_ALLOW_PRIVATE_URLS="1",
            BGSWAP_RUNWARE_POLL_INITIAL_S="0.1", BGSWAP_RUNWARE_POLL_MAX_S="0.2",
        )  # fmt: skip
        common = ("--provider", "runware", "--output", "out")
        first = bgswap("run", "m.csv", *common, "--batch-id", "r1", cwd=tmp_path, env=env)
        assert first.returncode == 0, first.stderr
        asked = len(fake.requests)
        checked = bgswap("validate", "m.csv", *common, cwd=tmp_path, env=env)
        assert checked.returncode == 0, checked.stderr
        # the URL row is the worker's to decide: its estimate stays in
        assert "3 would be skipped" in checked.stderr and "the rest $0.09" in checked.stderr
        forced_check = bgswap("validate", "m.csv", *common, "--force", cwd=tmp_path, env=env)
        assert "0 would be skipped" in forced_check.stderr and "$0.18" in forced_check.stderr
        second = bgswap("run", "m.csv", *common, "--batch-id", "r2", cwd=tmp_path, env=env)
        assert second.returncode == 0, second.stderr
        assert "0/4 succeeded, 4 skipped" in second.stderr and "cost $0.00" in second.stderr
        assert len(fake.requests) == asked
        forced = bgswap("run", "m.csv", *common, "--force", "--batch-id", "r3",
                        cwd=tmp_path, env=env)  # fmt: skip
        assert forced.returncode == 0 and "4/4 succeeded" in forced.stderr, forced.stderr
        assert len(fake.paid) == 8
    lines = [json.loads(x) for x in (tmp_path / "out/r2/manifest.jsonl").read_text().splitlines()]
    assert statuses(lines) == ["skipped"] * 4
    assert all(o["url"].startswith(str(tmp_path / "out/r1/")) for x in lines for o in x["outputs"])


def test_an_index_that_cannot_be_written_or_read_never_fails_a_row(
    catalog: Catalog, tmp_path: Path, fake: FakeRunware, caplog: pytest.LogCaptureFixture
) -> None:
    cat = catalog
    manifest = csv(*(f"r{n},{cat.image(f'r{n}.png', n)},p,TURBO" for n in range(2)))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "_index").write_text("a file where the index folder should be")
    _, first = cat.run(manifest, tmp_path / "out", "w1")
    assert statuses(first) == ["succeeded"] * 2 and len(fake.paid) == 2
    assert "not indexed" in caplog.text
    _, second = cat.run(manifest, tmp_path / "out", "w2")  # nothing indexed: both run
    assert statuses(second) == ["succeeded"] * 2 and len(fake.paid) == 4


def test_a_malformed_or_foreign_index_entry_is_a_miss(
    catalog: Catalog, tmp_path: Path, fake: FakeRunware
) -> None:
    cat = catalog
    manifest = csv(*(f"r{n},{cat.image(f'r{n}.png', n)},p,TURBO" for n in range(3)))
    cat.run(manifest, tmp_path / "out", "m1")
    entries = sorted((tmp_path / "out" / "_index").glob("*/*.json"))
    assert len(entries) == 3
    entries[0].write_text("{not json")
    other = json.loads(entries[2].read_text())
    entries[1].write_text(json.dumps(other))  # another fingerprint's entry under this name
    _, second = cat.run(manifest, tmp_path / "out", "m2")
    assert sorted(statuses(second)) == ["skipped", "succeeded", "succeeded"]
    assert len(fake.paid) == 5
