"""Manifests written by somebody else (an e-commerce import, say): each row reads only
under its roots, writes only inside its destinations, and cannot pass one object off as
another's. One hostile fixture per rule, through the real reader."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from producer.batch import SubmitOptions, Submitter, check_batch_id
from producer.manifest import RowDefaults, RowOutcome, read_manifest
from producer.staging import Stager, Unstageable
from servers.s3 import moto_s3
from worker.errors import Codes, UsageError
from worker.providers.local import LocalProvider
from worker.report import spreadsheet_safe, write_csv, write_jsonl
from worker.settings import Settings
from worker.state import BatchStore
from worker.storage import Storage

URL = "https://cdn.example.com/a.jpg"


def read_rows(rows: list[dict[str, Any]], d: RowDefaults) -> list[RowOutcome]:
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    return list(read_manifest(io.BytesIO(data), "jsonl", d))


def codes(outcome: RowOutcome) -> list[str]:
    return [e.code for e in outcome.errors]


def row(**values: Any) -> dict[str, Any]:
    return {"id": "sku", "image": URL, "prompt": "p", **values}


# -- local paths stay under their roots --------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """manifests/ (the root), with a product shot; secret/ beside it."""
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests" / "shot.png").write_bytes(b"png")
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "key.png").write_bytes(b"secret")
    os.symlink(tmp_path / "secret" / "key.png", tmp_path / "manifests" / "link.png")
    os.symlink(tmp_path / "secret", tmp_path / "manifests" / "dirlink")
    return tmp_path


@pytest.mark.parametrize(
    "ref",
    [
        "/etc/shadow",
        "/proc/self/environ",
        "../secret/key.png",
        "../../../../../../etc/passwd",
        "link.png",  # a symlink out of the root
        "dirlink/key.png",  # through a symlinked folder
        "~/.aws/credentials",
    ],
)
def test_a_local_path_outside_the_roots_is_refused_before_anything_opens_it(
    tree: Path, ref: str
) -> None:
    d = RowDefaults(base_dir=tree / "manifests")
    (outcome,) = read_rows([row(image=ref)], d)
    assert codes(outcome) == [Codes.PATH_OUTSIDE_ROOT], outcome.errors
    assert outcome.errors[0].column == "image"
    assert "BGSWAP_LOCAL_ROOTS" in outcome.errors[0].reason


def test_every_image_column_is_confined(tree: Path) -> None:
    d = RowDefaults(base_dir=tree / "manifests")
    (outcome,) = read_rows(
        [row(style_reference_images=["shot.png", "../secret/key.png"], provider="local")], d
    )
    assert codes(outcome) == [Codes.PATH_OUTSIDE_ROOT]
    (outcome,) = read_rows([row(background="../secret/key.png")], d)
    assert codes(outcome) == [Codes.PATH_OUTSIDE_ROOT]


def test_a_path_inside_the_roots_is_taken_as_its_real_path(tree: Path) -> None:
    d = RowDefaults(base_dir=tree / "manifests")
    (outcome,) = read_rows([row(image="./shot.png")], d)
    assert outcome.ok and outcome.spec is not None
    assert outcome.spec.image == os.path.realpath(tree / "manifests" / "shot.png")


def test_more_roots_widen_what_a_row_may_read(tree: Path) -> None:
    d = RowDefaults(base_dir=tree / "manifests", local_roots=(tree / "manifests", tree / "secret"))
    (outcome,) = read_rows([row(image="link.png")], d)
    assert outcome.ok and outcome.spec is not None
    assert outcome.spec.image == str((tree / "secret" / "key.png").resolve())


def test_a_root_is_a_whole_folder_not_a_name_prefix(tree: Path) -> None:
    (tree / "manifests-evil").mkdir()
    (tree / "manifests-evil" / "x.png").write_bytes(b"x")
    d = RowDefaults(base_dir=tree / "manifests")
    (outcome,) = read_rows([row(image="../manifests-evil/x.png")], d)
    assert codes(outcome) == [Codes.PATH_OUTSIDE_ROOT]


# -- outputs stay inside their destinations ----------------------------------------------

INSIDE = RowDefaults(output_prefixes=("s3://catalog/bgswap", "s3://shared/imports"))


@pytest.mark.parametrize(
    "dest",
    [
        "s3://catalog/bgswap/b1/x.jpg",
        "s3://shared/imports/2026/x.png",
        "https://bucket.s3.amazonaws.com/x.jpg?X-Amz-Signature=abc",  # its own authority
    ],
)
def test_outputs_inside_the_destinations_are_taken(dest: str) -> None:
    (outcome,) = read_rows([row(output=dest)], INSIDE)
    assert outcome.ok, outcome.errors


@pytest.mark.parametrize(
    ("dest", "code"),
    [
        ("s3://other-bucket/x.jpg", Codes.OUTPUT_OUTSIDE_PREFIX),
        ("s3://catalog/x.jpg", Codes.OUTPUT_OUTSIDE_PREFIX),  # the bucket, not the prefix
        ("s3://catalog/bgswap-evil/x.jpg", Codes.OUTPUT_OUTSIDE_PREFIX),  # a name prefix only
        ("s3://catalog/bgswap/../secrets/x.jpg", Codes.INVALID_URL),
        ("s3://catalog/bgswap//x.jpg", Codes.INVALID_URL),
        ("s3://catalog/bgswap/./x.jpg", Codes.INVALID_URL),
    ],
)
def test_outputs_outside_the_destinations_are_refused(dest: str, code: str) -> None:
    (outcome,) = read_rows([row(output=dest)], INSIDE)
    assert codes(outcome) == [code], outcome.errors
    assert outcome.errors[0].column == "output"


def test_with_a_local_output_no_s3_destination_is_allowed_unless_listed() -> None:
    (outcome,) = read_rows([row(output="s3://catalog/bgswap/x.jpg")], RowDefaults())
    assert codes(outcome) == [Codes.OUTPUT_OUTSIDE_PREFIX]


# -- batch ids ---------------------------------------------------------------------------


@pytest.mark.parametrize("bid", ["20261201-a", "nightly.2026-12-01", "A_b-1", "x" * 64])
def test_batch_ids_that_are_taken(bid: str) -> None:
    assert check_batch_id(bid) == bid


@pytest.mark.parametrize(
    "bid", ["../../../x", ".", "..", "a/b", "a:b", "a b", "", "x" * 65, "é", "a\\b", "a\nb"]
)
def test_batch_ids_that_could_escape_or_collide_are_refused(bid: str) -> None:
    with pytest.raises(UsageError, match="batch id"):
        check_batch_id(bid)


# -- one object, one row -----------------------------------------------------------------

ROOT = RowDefaults(destination_root="s3://catalog/bgswap/b1", available_providers=frozenset(
    {"local", "runware"}), output_prefixes=("s3://catalog/bgswap",))  # fmt: skip


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (row(id="x"), row(id="x.jpg")),
        (row(id="p", output_format="PNG"), row(id="p.png")),
        (row(id="Shirt"), row(id="shirt")),  # case-insensitive filesystems, S3 consoles
        (row(id="a", output="s3://catalog/bgswap/same.jpg"),
         row(id="b", output="s3://catalog/bgswap/same.jpg")),
        (row(id="a", output="s3://catalog/bgswap/b1/c.jpg"), row(id="c")),  # a default key
        (row(id="x", num_results=2, provider="runware"), row(id="x-1")),
    ],
)  # fmt: skip
def test_rows_that_would_write_one_object_collide(
    first: dict[str, Any], second: dict[str, Any]
) -> None:
    a, b = read_rows([first, row(id="between"), second], ROOT)[::2]
    assert a.ok, a.errors
    assert codes(b) == [Codes.DUPLICATE_OUTPUT], b.errors
    assert "line 1" in b.errors[0].reason  # names the row it collides with


def test_a_rejected_row_claims_no_output() -> None:
    outcomes = read_rows([row(id="x", seed="bad", provider="runware"), row(id="x.jpg")], ROOT)
    assert not outcomes[0].ok and outcomes[1].ok


@pytest.mark.parametrize("value", [123, 1.5, True, None, ["a"], {"a": 1}])
def test_a_json_id_that_is_not_a_string_is_refused(value: Any) -> None:
    (outcome,) = read_rows([row(id=value)], ROOT)
    assert not outcome.ok
    expected = Codes.MISSING_FIELD if value is None else Codes.INVALID_VALUE
    assert codes(outcome) == [expected], outcome.errors
    if value is not None:
        assert "must be a string" in outcome.errors[0].reason


def test_true_and_the_string_true_are_not_one_row_twice() -> None:
    a, b = read_rows([row(id="true"), row(id=True)], ROOT)
    assert a.ok and codes(b) == [Codes.INVALID_VALUE]


# -- reports a spreadsheet opens ---------------------------------------------------------


@pytest.mark.parametrize(
    "cell", ['=HYPERLINK("http://x")', "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx"]
)
def test_csv_report_cells_that_start_like_a_formula_are_defused(cell: str) -> None:
    line = {"id": cell, "status": "failed", "prompt": cell, "meta": {"k": cell}}
    out = io.StringIO()
    write_csv([line], out)
    assert spreadsheet_safe(cell) == "'" + cell
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert rows[0]["id"] == "'" + cell and rows[0]["prompt"] == "'" + cell
    # JSON Lines stays exact
    exact = io.StringIO()
    write_jsonl([line], exact)
    assert json.loads(exact.getvalue())["id"] == cell


def test_csv_report_leaves_ordinary_cells_alone() -> None:
    assert spreadsheet_safe("sku-1") == "sku-1"
    assert spreadsheet_safe(0.06) == 0.06
    assert spreadsheet_safe(None) is None


# -- bounded manifests -------------------------------------------------------------------

SMALL = RowDefaults(max_field_bytes=4096)


def read_csv(data: bytes, d: RowDefaults = SMALL) -> list[RowOutcome]:
    return list(read_manifest(io.BytesIO(data), "csv", d))


def test_a_field_over_the_cap_is_a_row_error_and_the_rows_around_it_go_on() -> None:
    data = (f"id,image,prompt\na,{URL},p\nb,{URL},{'x' * 10_000}\nc,{URL},p\n").encode()
    a, b, c = read_csv(data)
    assert a.ok and c.ok and (c.line, c.row_id) == (4, "c")
    assert codes(b) == [Codes.FIELD_TOO_LARGE] and b.line == 3
    assert "4096 bytes" in b.errors[0].reason and "BGSWAP_MAX_FIELD_BYTES" in b.errors[0].reason


def test_a_stray_opening_quote_is_an_error_at_its_line_not_a_silent_merge() -> None:
    rows = "".join(f"r{i},{URL},p\n" for i in range(3, 400))
    data = (f'id,image,prompt\nr1,{URL},p\nr2,"{URL},p\n' + rows).encode()
    outcomes = read_csv(data)
    assert [o.row_id for o in outcomes if o.ok] == ["r1", *(f"r{i}" for i in range(3, 400))]
    (bad,) = [o for o in outcomes if not o.ok]
    assert bad.line == 3 and codes(bad) == [Codes.FIELD_TOO_LARGE]
    assert "quote opened on line 3" in bad.errors[0].reason


def test_an_unclosed_quote_at_the_end_names_its_line_and_keeps_the_rows_after_it() -> None:
    data = (f'id,image,prompt\nr1,{URL},p\nr2,{URL},"p\nr3,{URL},p\nr4,{URL},p\n').encode()
    outcomes = read_csv(data, RowDefaults())
    assert [(o.line, o.row_id, o.ok) for o in outcomes if o.ok] == [
        (2, "r1", True), (4, "r3", True), (5, "r4", True)
    ]  # fmt: skip
    (bad,) = [o for o in outcomes if not o.ok]
    assert bad.line == 3 and codes(bad) == [Codes.UNTERMINATED_QUOTE]
    assert "opened on line 3 is never closed" in bad.errors[0].reason


def test_a_quoted_field_may_still_span_lines() -> None:
    data = f'id,image,prompt\nr1,{URL},"one\ntwo"\nr2,{URL},p\n'.encode()
    r1, r2 = read_csv(data)
    assert r1.ok and r1.spec is not None and r1.spec.prompt == "one\ntwo" and r2.ok


def test_a_jsonl_line_over_the_cap_is_a_row_error() -> None:
    data = "".join(
        json.dumps(r) + "\n" for r in [row(id="a"), row(id="b", prompt="x" * 9000), row(id="c")]
    ).encode()
    a, b, c = list(read_manifest(io.BytesIO(data), "jsonl", SMALL))
    assert a.ok and c.ok and codes(b) == [Codes.FIELD_TOO_LARGE] and b.line == 2


def test_reading_a_huge_field_holds_no_more_than_the_cap(tmp_path: Path) -> None:
    import tracemalloc

    path = tmp_path / "huge.csv"
    with path.open("wb") as fh:
        fh.write(f"id,image,prompt\na,{URL},p\nb,{URL},".encode())
        for _ in range(64):
            fh.write(b"y" * (1 << 20))  # a 64 MB field
        fh.write(f"\nc,{URL},p\n".encode())
    tracemalloc.start()
    with path.open("rb") as fh:
        outcomes = list(read_manifest(fh, "csv", RowDefaults()))  # the default cap: 1 MB
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [codes(o) for o in outcomes] == [[], [Codes.FIELD_TOO_LARGE], []]
    assert peak < 8 << 20, peak  # the 1 MB cap, a couple of times over, never the 64 MB


# -- every source is an image before it goes anywhere ------------------------------------


def png_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    from examples.make_examples import product_shot

    buf = io.BytesIO()
    product_shot("box", size, (240, 240, 240), 1).save(buf, "PNG")
    return buf.getvalue()


def declared_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares a huge image (a compressed flat colour)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (width, height), 240).save(buf, "PNG", optimize=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return declared_png(7999, 7999)


def test_a_file_that_is_not_an_image_is_never_staged(
    tmp_path: Path, redis_client: Any, redis_url: str
) -> None:
    (tmp_path / "real.png").write_bytes(png_bytes())
    (tmp_path / "environ.png").write_bytes(b"RUNWARE_API_KEY=secret\nFAL_KEY=also-secret\n")
    with moto_s3() as s3:
        settings = Settings(s3_endpoint_url=s3.endpoint_url)
        stage = Stager(Storage(settings), "s3://bgswap-test/out", settings)
        d = RowDefaults(base_dir=tmp_path, destination_root="s3://bgswap-test/out/st1")
        data = b"id,image,prompt\na,real.png,p\nb,environ.png,p\n"
        store = BatchStore.from_url(redis_url)
        submitter = Submitter(store, lambda msgs: None, lambda name: LocalProvider(), stage)
        options = SubmitOptions(batch_id="st1", output="s3://bgswap-test/out", defaults=d)
        report = submitter.submit(read_manifest(io.BytesIO(data), "csv", d), options)
        # moto keeps its buckets for the whole test process: look at this batch only
        listed = s3.client.list_objects_v2(Bucket=s3.bucket, Prefix="out/st1/").get("Contents", [])
    assert (report.valid, report.rejected) == (1, 1)
    assert report.errors[0].code == Codes.IMAGE_UNREADABLE and report.errors[0].column == "image"
    assert [o["Key"] for o in listed] == ["out/st1/_sources/a-image.png"]  # nothing else left
    record = json.loads(store.job("st1", 1) or "{}")
    assert record["rejected"] and "secret" not in json.dumps(record)


def test_staging_reads_no_more_than_the_byte_cap(tmp_path: Path) -> None:
    import tracemalloc

    from worker.jobs import JobSpec

    big = tmp_path / "big.png"
    with big.open("wb") as fh:
        fh.truncate(600 << 20)  # 600 MB, sparse
    settings = Settings()
    stage = Stager(Storage(settings), "s3://nowhere/out", settings)
    spec = JobSpec(id="a", image=str(big), prompt="p", provider="local")
    tracemalloc.start()
    with pytest.raises(Unstageable) as info:
        stage(spec, "b1")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert info.value.error.code == Codes.SOURCE_TOO_LARGE
    assert peak < 1 << 20  # refused from its size, not read


def test_a_declared_huge_image_is_refused_before_its_pixels_are_allocated(bomb: bytes) -> None:
    import tracemalloc

    from worker.errors import ImageRejected
    from worker.imaging import check_image, decode_image

    assert len(bomb) < 300_000
    tracemalloc.start()
    for attempt in (lambda: decode_image(bomb, 64_000_000, 256 << 20),
                    lambda: check_image(bomb, 64_000_000, 256 << 20)):  # fmt: skip
        with pytest.raises(ImageRejected) as info:
            attempt()
        assert info.value.code == Codes.IMAGE_TOO_LARGE
        assert "BGSWAP_MAX_IMAGE_MEMORY_MB" in info.value.message
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 << 20  # a 64 MP decode would be 64 MB at the very least


def test_a_large_jpeg_is_checked_at_a_fraction_of_its_memory() -> None:
    import tracemalloc

    from PIL import Image

    from worker.imaging import check_image

    buf = io.BytesIO()
    Image.new("RGB", (6000, 4000), (200, 100, 50)).save(buf, "JPEG", quality=50)
    tracemalloc.start()
    info = check_image(buf.getvalue(), 64_000_000, 64 << 20)  # a 24 MP decode: 72 MB
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert (info.format, info.width, info.height) == ("JPEG", 6000, 4000)
    assert peak < 8 << 20


def test_the_default_image_budget_follows_the_pixel_cap_and_the_machine() -> None:
    from worker.settings import default_memory_budget

    mb = 1 << 20
    assert default_memory_budget(1_000_000) == 16_000_000  # the pixel cap's decode, no more
    budget = default_memory_budget(64_000_000)
    assert 256 * mb <= budget <= 64_000_000 * 16
    assert Settings(max_image_memory_mb=100).image_memory_budget == 100 * mb


def test_s3_without_credentials_fails_once_and_clearly_in_a_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker.errors import SourceRejected, StorageRejected
    from worker.fetch import SourceFetcher

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(s3_endpoint_url="http://127.0.0.1:9")  # never reached: no signature
    with pytest.raises(SourceRejected) as source:
        SourceFetcher(settings)("s3://catalog/raw/a.png", "image")
    assert source.value.code == Codes.SOURCE_NO_CREDENTIALS and not source.value.retryable
    with pytest.raises(StorageRejected) as storage:
        Storage(settings, upload_attempts=1).put("s3://catalog/out/a.png", b"x", "image/png")
    assert storage.value.code == Codes.STORAGE_NO_CREDENTIALS and not storage.value.retryable


def test_lines_read_again_after_a_broken_row_keep_their_own_errors() -> None:
    data = (
        f'id,image,prompt\nr1,{URL},"p\nr2,{URL},p\xff\xfe\nr3,{URL},{"z" * 5000}\nr4,{URL},p\n'
    ).encode("latin-1")
    outcomes = read_csv(data)
    assert [(o.line, codes(o)) for o in outcomes] == [
        (2, [Codes.UNTERMINATED_QUOTE]),
        (3, [Codes.INVALID_VALUE]),  # not UTF-8
        (4, [Codes.FIELD_TOO_LARGE]),
        (5, []),
    ]
