"""The schedule file and when schedules fire (pure: worker/schedules.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from worker.errors import UsageError
from worker.schedules import (
    batch_id_for,
    due,
    is_manifest_name,
    last_slot,
    next_run,
    parse_schedules,
)

BERLIN = ZoneInfo("Europe/Berlin")


def parse(text: str, tmp_path: Path, roots: tuple[Path, ...] | None = None):  # type: ignore[no-untyped-def]
    return parse_schedules(
        text, base_dir=tmp_path, roots=(tmp_path,) if roots is None else roots, where="s.toml"
    )


def one(tmp_path: Path, **fields: object):  # type: ignore[no-untyped-def]
    lines = [f"{k} = {_toml(v)}" for k, v in {"name": "n", **fields}.items()]
    return parse("[[schedule]]\n" + "\n".join(lines) + "\n", tmp_path)[0]


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return f'"{value}"' if isinstance(value, str) else str(value)


def test_a_full_file_parses(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    text = """
[[schedule]]
name = "nightly"
cron = "0 2 * * *"
timezone = "Europe/Berlin"
manifest = "catalog.csv"
output = "s3://bucket/out/"
provider = "local"
options = { background = "#ffffff", shadow = false, output_quality = 90 }
prompt = "a {category} on marble"
callback_url = "https://hooks.example.com/bgswap"
force = true

[[schedule]]
name = "incoming"
watch = "in"
every_minutes = 5
output = "out"
"""
    nightly, incoming = parse(text, tmp_path)
    assert nightly.kind == "cron" and nightly.timezone == "Europe/Berlin"
    assert nightly.manifest == str(tmp_path / "catalog.csv")
    assert nightly.set_items == ["background=#ffffff", "shadow=false", "output_quality=90"]
    assert nightly.force and nightly.callback_url == "https://hooks.example.com/bgswap"
    assert incoming.kind == "watch" and incoming.interval_s == 300
    assert incoming.watch == str(tmp_path / "in") and incoming.output == str(tmp_path / "out")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"cron": "0 2 * *", "manifest": "m.csv"}, "field 'cron': '0 2 * *' is not a 5-field"),
        ({"cron": "0 25 * * *", "manifest": "m.csv"}, "field 'cron': '0 25 * * *' is not a cron"),
        (
            {"cron": "0 2 * * *", "manifest": "m.csv", "timezone": "Mars/Olympus"},
            "field 'timezone': 'Mars/Olympus' is not an IANA time zone",
        ),
        (
            {"cron": "0 2 * * *", "manifest": "/etc/passwd"},
            "field 'manifest': /etc/passwd is not under BGSWAP_LOCAL_ROOTS",
        ),
        (
            {"cron": "0 2 * * *", "manifest": "ftp://x/m.csv"},
            "field 'manifest': 'ftp://x/m.csv': not",
        ),
        (
            {"cron": "0 2 * * *", "manifest": "s3://bucket"},
            "field 'manifest': 's3://bucket' is not an s3://bucket/key",
        ),
        ({"cron": "0 2 * * *"}, "manifest is required"),
        ({"manifest": "m.csv"}, "give one of cron, every_seconds"),
        ({"cron": "0 2 * * *", "every_seconds": 5, "manifest": "m.csv"}, "give one of cron"),
        (
            {"watch": "https://x/in/", "every_minutes": 5},
            "field 'watch': 'https://x/in/': not an s3:// prefix",
        ),
        (
            {"watch": ".", "every_minutes": 5, "manifest": "m.csv"},
            "a watch schedule has no manifest",
        ),
        ({"watch": "."}, "needs one of every_minutes, every_seconds"),
        (
            {"cron": "0 2 * * *", "manifest": "m.csv", "colour": "red"},
            "field 'colour': unknown field",
        ),
        ({"cron": "0 2 * * *", "manifest": "m.csv", "name": "a b"}, "field 'name'"),
        (
            {"cron": "0 2 * * *", "manifest": "m.csv", "callback_url": "ftp://x"},
            "field 'callback_url'",
        ),
    ],
)
def test_refused_at_load_time_naming_schedule_and_field(
    tmp_path: Path, fields: dict[str, object], message: str
) -> None:
    with pytest.raises(UsageError) as exc:
        one(tmp_path, **fields)
    assert str(exc.value).startswith("s.toml: schedule ")
    assert message in str(exc.value)


def test_a_local_manifest_is_confined_to_the_roots(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"schedule 'n', field 'manifest'.*BGSWAP_LOCAL_ROOTS"):
        parse('[[schedule]]\nname="n"\ncron="* * * * *"\nmanifest="m.csv"\n', tmp_path, ())
    inside = tmp_path / "a"
    inside.mkdir()
    (inside / "link").symlink_to("/etc")  # a symlink out of the root is outside
    with pytest.raises(UsageError, match="not under"):
        parse(f'[[schedule]]\nname="n"\ncron="* * * * *"\nmanifest="{inside}/link/passwd"\n',
              tmp_path, (inside,))  # fmt: skip


def test_duplicate_names_and_bad_toml(tmp_path: Path) -> None:
    block = '[[schedule]]\nname="n"\ncron="* * * * *"\nmanifest="m.csv"\n'
    with pytest.raises(UsageError, match="schedule 'n': the name is used twice"):
        parse(block + block, tmp_path)
    with pytest.raises(UsageError, match=r"s\.toml: not TOML"):
        parse("[[schedule]\n", tmp_path)


def test_next_run_in_the_schedules_zone(tmp_path: Path) -> None:
    s = one(tmp_path, cron="0 2 * * *", timezone="Europe/Berlin", manifest="m.csv")
    now = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)
    assert next_run(s, now) == datetime(2026, 1, 11, 2, 0, tzinfo=BERLIN)
    assert next_run(s, now).astimezone(UTC) == datetime(2026, 1, 11, 1, 0, tzinfo=UTC)
    assert next_run(s, now).utcoffset() == timedelta(hours=1)


def test_next_run_across_the_spring_dst_change(tmp_path: Path) -> None:
    # 2026-03-29 in Berlin: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist that night.
    s = one(tmp_path, cron="30 2 * * *", timezone="Europe/Berlin", manifest="m.csv")
    before = datetime(2026, 3, 28, 12, 0, tzinfo=UTC)
    first = next_run(s, before)
    assert first.astimezone(UTC) == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)  # 03:00 CEST
    second = next_run(s, first)
    assert second.astimezone(UTC) == datetime(2026, 3, 30, 0, 30, tzinfo=UTC)  # 02:30 CEST
    nine = one(tmp_path, cron="0 9 * * *", timezone="Europe/Berlin", manifest="m.csv")
    # 09:00 local is 08:00 UTC before the change and 07:00 UTC after it
    assert next_run(nine, before).astimezone(UTC) == datetime(2026, 3, 29, 7, 0, tzinfo=UTC)
    assert next_run(nine, datetime(2026, 3, 27, 12, tzinfo=UTC)).astimezone(UTC) == datetime(
        2026, 3, 28, 8, 0, tzinfo=UTC
    )


def test_a_nightly_slot_fires_once_on_the_autumn_night(tmp_path: Path) -> None:
    # 2026-10-25 in Berlin: 03:00 CEST goes back to 02:00 CET; 02:30 happens twice.
    s = one(tmp_path, cron="30 2 * * *", timezone="Europe/Berlin", manifest="m.csv")
    first = next_run(s, datetime(2026, 10, 24, 12, 0, tzinfo=UTC))
    assert first.astimezone(UTC) == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)
    assert next_run(s, first).astimezone(UTC) == datetime(2026, 10, 26, 1, 30, tzinfo=UTC)


def test_due_fires_the_latest_slot_once(tmp_path: Path) -> None:
    s = one(tmp_path, cron="0 2 * * *", timezone="Europe/Berlin", manifest="m.csv")
    slot = datetime(2026, 1, 11, 1, 0, tzinfo=UTC)
    assert last_slot(s, slot) == slot  # a slot counts from its own second on
    assert due(s, slot + timedelta(seconds=20), None, 60) == slot
    assert due(s, slot + timedelta(seconds=20), slot.timestamp(), 60) is None
    # never fired: a slot long past (the schedule added at noon) waits for the next night
    assert due(s, slot + timedelta(hours=10), None, 60) is None
    # fired before, then beat was down for three nights: one catch-up, not three
    later = slot + timedelta(days=3, hours=5)
    assert due(s, later, slot.timestamp(), 60) == slot + timedelta(days=3)


def test_every_seconds_slots_and_batch_ids(tmp_path: Path) -> None:
    s = one(tmp_path, every_seconds=5, manifest="m.csv", timezone="Europe/Berlin")
    now = datetime(2026, 1, 11, 1, 0, 7, tzinfo=UTC)
    assert last_slot(s, now) == datetime(2026, 1, 11, 1, 0, 5, tzinfo=UTC)
    assert next_run(s, now).astimezone(UTC) == datetime(2026, 1, 11, 1, 0, 10, tzinfo=UTC)
    assert batch_id_for(s, last_slot(s, now)) == "n-20260111-020005"
    nightly = one(tmp_path, cron="0 2 * * *", manifest="m.csv")
    assert batch_id_for(nightly, datetime(2026, 1, 11, 2, 0, tzinfo=UTC)) == "n-20260111-0200"
    tagged = batch_id_for(nightly, datetime(2026, 1, 11, 2, 0, tzinfo=UTC), tag="k|e")
    assert tagged.startswith("n-20260111-0200-") and len(tagged) == len("n-20260111-0200-") + 8


def test_manifest_names() -> None:
    assert is_manifest_name("in/a.csv") and is_manifest_name("B.JSONL")
    assert not is_manifest_name("in/a.csv.tmp") and not is_manifest_name("in/")
