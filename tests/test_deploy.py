"""deploy/: what the Kubernetes manifests, compose.yaml and the Grafana dashboard name
must exist in the code. Commands are the project's entry points, environment variables
are settings, probes hit routes on the ports served, KEDA watches the list Celery really
uses, and the dashboard reads only the metric series the workers export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
import typer
import yaml

from worker.settings import Settings, env_variable, load_settings

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"

# Environment variables a bgswap container may get besides the settings' own names:
# what boto3 reads for the presigned uploads, the metrics' directory, and the Redis
# password that the broker URL is made of (Kubernetes) and KEDA reads.
OTHER_ENV = {
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "PROMETHEUS_MULTIPROC_DIR",
    "REDIS_PASSWORD",
}
SETTINGS_ENV = {env_variable(name) for name in Settings.model_fields}
CELERY_FLAGS = {"worker": {"-E"}, "beat": set()}


# -- helpers ---------------------------------------------------------------------------


def check_command(argv: list[str]) -> None:
    """``argv`` is a real entry point: ``bgswap <command> [options]`` that the CLI parses,
    or ``celery -A worker worker|beat`` with an app that imports."""
    assert argv, "an empty command"
    if argv[0] == "bgswap":
        from producer.cli import app

        group = typer.main.get_command(app)
        commands = group.commands  # type: ignore[attr-defined]
        assert len(argv) > 1, argv
        assert argv[1] in commands, f"bgswap has no command {argv[1]!r}: {argv}"
        # Parses the options as the CLI would (unknown ones raise), without running it.
        commands[argv[1]].make_context(argv[1], list(argv[2:]))
        return
    assert argv[:3] == ["celery", "-A", "worker"], argv
    if argv[3:4] == ["-q"]:  # Celery's global --quiet: no banner on stdout
        argv = argv[:3] + argv[4:]
    assert len(argv) >= 4, argv
    assert argv[3] in CELERY_FLAGS, argv
    assert set(argv[4:]) <= CELERY_FLAGS[argv[3]], argv
    import worker
    from worker.tasks import process_row

    assert worker.app.main == "bgswap"
    assert process_row.name in worker.app.tasks


def check_env_name(name: str) -> None:
    if name.startswith("BGSWAP_"):
        assert name in SETTINGS_ENV, f"{name} is not a setting (worker/settings.py)"
    else:
        assert name in SETTINGS_ENV | OTHER_ENV, f"{name} is neither a setting nor documented"


def routes() -> set[str]:
    from producer.api import create_app
    from worker.celery_app import app as celery_app

    before = celery_app.conf.broker_url
    try:  # create_app points the Celery app at the settings' broker: put it back
        api = create_app(Settings(broker_url="redis://127.0.0.1:1/0"))
    finally:
        celery_app.conf.broker_url = before
    return set(api.openapi()["paths"])  # every route the app serves, /healthz included


def bgswap_image(image: str) -> bool:
    return image.rsplit("/", 1)[-1].split(":", maxsplit=1)[0] == "bgswap"


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: `kubectl kustomize deploy/k8s` cannot render")
    out = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "k8s")],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert docs
    return docs


def kind(docs: list[dict[str, Any]], kind_: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind_]


def named(docs: list[dict[str, Any]], kind_: str, name: str) -> dict[str, Any]:
    found = [d for d in kind(docs, kind_) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind_}/{name}: {len(found)} found"
    return found[0]


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            yield doc, doc["spec"]["template"]


def bgswap_containers(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (doc["metadata"]["name"], c)
        for doc, template in pod_specs(docs)
        for c in template["spec"]["containers"]
        if bgswap_image(c["image"])
    ]


def container_port(container: dict[str, Any], port: int | str) -> int:
    for p in container.get("ports", []):
        if port in (p["containerPort"], p.get("name")):
            return int(p["containerPort"])
    raise AssertionError(f"{container['name']} has no port {port!r}")


def quantity_mib(value: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1.0, "Gi": 1024.0, "M": 1e6 / (1 << 20), "G": 1e9 / (1 << 20)}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return float(value.removesuffix(suffix)) * factor
    return float(value) / (1 << 20)


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# -- Kubernetes ------------------------------------------------------------------------


def test_every_bgswap_container_runs_an_entry_point_of_the_project(
    rendered: list[dict[str, Any]],
) -> None:
    containers = bgswap_containers(rendered)
    commands = {name: c["command"] + c.get("args", []) for name, c in containers}
    assert set(commands) == {"bgswap-worker", "bgswap-beat", "bgswap-api"}
    assert commands["bgswap-worker"][:5] == ["celery", "-A", "worker", "-q", "worker"]
    assert commands["bgswap-beat"] == ["celery", "-A", "worker", "-q", "beat"]
    assert commands["bgswap-api"][:2] == ["bgswap", "serve"]
    for _, argv in commands.items():
        check_command(argv)
    for _, c in containers:
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            if "exec" in c.get(probe, {}):
                check_command(c[probe]["exec"]["command"])


def test_every_environment_variable_is_a_setting_or_documented(
    rendered: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    config_maps = {d["metadata"]["name"]: d.get("data", {}) for d in kind(rendered, "ConfigMap")}
    containers = bgswap_containers(rendered)
    seen: set[str] = set()
    for _, c in containers:
        for source in c.get("envFrom", []):
            if "configMapRef" in source:
                data = config_maps[source["configMapRef"]["name"]]
                assert data
                seen.update(data)
                for name, value in data.items():
                    check_env_name(name)
                    monkeypatch.setenv(name, value)
            else:  # the Secret, made from deploy/bgswap.env: its names are checked there
                assert source["secretRef"]["name"] == "bgswap-secrets"
        for var in c.get("env", []):
            check_env_name(var["name"])
            seen.add(var["name"])
    assert {"BGSWAP_METRICS_PORT", "BGSWAP_METRICS_HOST", "BGSWAP_BROKER_URL"} <= seen
    # The ConfigMap's values are valid settings too (an unknown or bad one would stop
    # every process at its start).
    settings = load_settings()
    assert settings.metrics_port == 9808
    assert settings.metrics_host == "0.0.0.0"
    assert settings.log_format == "json"


def test_secret_keys_are_the_documented_ones(rendered: list[dict[str, Any]]) -> None:
    documented = env_example_names()
    refs = [
        var["valueFrom"]["secretKeyRef"]
        for _, template in pod_specs(rendered)
        for c in template["spec"]["containers"]
        for var in c.get("env", [])
        if "secretKeyRef" in var.get("valueFrom", {})
    ]
    refs += [
        ref
        for auth in kind(rendered, "TriggerAuthentication")
        for ref in auth["spec"]["secretTargetRef"]
    ]
    assert refs
    for ref in refs:
        assert ref["name"] == "bgswap-secrets"
        assert ref["key"] in documented, ref


def test_probes_hit_real_routes_on_the_ports_served(rendered: list[dict[str, Any]]) -> None:
    paths = routes()
    api = dict(bgswap_containers(rendered))["bgswap-api"]
    argv = api["command"] + api.get("args", [])
    serve_port = int(option(argv, "--port"))
    assert option(argv, "--host") == "0.0.0.0"
    assert container_port(api, "http") == serve_port
    probed = {}
    for probe in ("readinessProbe", "livenessProbe"):
        http = api[probe]["httpGet"]
        assert http["path"] in paths, f"{probe}: no route {http['path']}"
        assert container_port(api, http["port"]) == serve_port
        probed[probe] = http["path"]
    assert probed == {"readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    service = named(rendered, "Service", "bgswap-api")
    target = service["spec"]["ports"][0]["targetPort"]
    assert container_port(api, target) == serve_port
    worker = dict(bgswap_containers(rendered))["bgswap-worker"]
    assert worker["livenessProbe"]["exec"]["command"] == ["bgswap", "health", "--this-host"]
    # Generous: a Redis blip of a minute must not restart the workers.
    live = worker["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 120


def test_health_routes_answer_with_a_real_redis(redis_url: str) -> None:
    from fastapi.testclient import TestClient

    from producer.api import create_app
    from worker.celery_app import app as celery_app

    before = celery_app.conf.broker_url
    try:
        api = create_app(Settings(broker_url=redis_url))
    finally:
        celery_app.conf.broker_url = before
    with TestClient(api) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200


def test_metrics_port_and_scrape_annotations(rendered: list[dict[str, Any]]) -> None:
    pods = {doc["metadata"]["name"]: template for doc, template in pod_specs(rendered)}
    for name in ("bgswap-worker", "bgswap-api"):
        template = pods[name]
        (c,) = template["spec"]["containers"]
        metrics = [p for p in c["ports"] if p.get("name") == "metrics"]
        assert [p["containerPort"] for p in metrics] == [9808], name
        notes = template["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true"
        assert notes["prometheus.io/port"] == "9808"
        assert notes["prometheus.io/path"] == "/metrics"


def test_worker_grace_period_covers_the_sigterm_hand_back(
    rendered: list[dict[str, Any]],
) -> None:
    from worker.tasks import ADOPT_WAIT_S

    defaults = Settings()
    worker = named(rendered, "Deployment", "bgswap-worker")
    grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # A delivery's wait for room, then the longest step under way (a fal submit's wait,
    # longer than an upload's), with room for the hand-back and the exit.
    longest_step = max(defaults.fal_submit_timeout_s, defaults.upload_timeout_s)
    assert grace >= ADOPT_WAIT_S + longest_step + 30
    pdb = kind(rendered, "PodDisruptionBudget")
    assert [p["spec"]["selector"]["matchLabels"] for p in pdb] == [
        worker["spec"]["selector"]["matchLabels"]
    ]
    # Requests as measured (docs/benchmarks.md: 272-278 MB peak with 200 in flight).
    (c,) = worker["spec"]["template"]["spec"]["containers"]
    assert quantity_mib(c["resources"]["requests"]["memory"]) * (1 << 20) >= 278e6
    assert quantity_mib(c["resources"]["limits"]["memory"]) >= quantity_mib(
        c["resources"]["requests"]["memory"]
    )


def test_beat_is_one_replica_recreated(rendered: list[dict[str, Any]]) -> None:
    beat = named(rendered, "Deployment", "bgswap-beat")
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"] == {"type": "Recreate"}


def test_redis_runs_the_projects_redis_conf(rendered: list[dict[str, Any]]) -> None:
    assert (DEPLOY / "k8s/base/redis.conf").read_text() == (DEPLOY / "redis.conf").read_text()
    redis_set = named(rendered, "StatefulSet", "bgswap-redis")
    spec = redis_set["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    conf_volume = next(v for v in spec["volumes"] if "configMap" in v)
    conf = next(
        d
        for d in kind(rendered, "ConfigMap")
        if d["metadata"]["name"] == conf_volume["configMap"]["name"]
    )
    assert conf["data"]["redis.conf"] == (DEPLOY / "redis.conf").read_text()
    mount = next(m for m in c["volumeMounts"] if m["name"] == conf_volume["name"])
    assert c["args"][0] == f"{mount['mountPath']}/redis.conf"
    assert any(m["mountPath"] == "/data" for m in c["volumeMounts"])
    assert redis_set["spec"]["volumeClaimTemplates"]


def test_keda_scales_the_workers_on_celerys_own_list(rendered: list[dict[str, Any]]) -> None:
    from worker.celery_app import QUEUE

    (scaled,) = kind(rendered, "ScaledObject")
    target = named(rendered, "Deployment", scaled["spec"]["scaleTargetRef"]["name"])
    (c,) = target["spec"]["template"]["spec"]["containers"]
    assert c["command"][:5] == ["celery", "-A", "worker", "-q", "worker"]
    triggers = {t["type"]: t for t in scaled["spec"]["triggers"]}
    assert set(triggers) == {"redis", "prometheus"}
    redis_trigger = triggers["redis"]
    assert redis_trigger["metadata"]["listName"] == QUEUE
    host = redis_trigger["metadata"]["address"].split(":")[0]
    namespace = scaled["metadata"]["namespace"]
    assert host == f"bgswap-redis.{namespace}.svc.cluster.local"
    auth = named(rendered, "TriggerAuthentication", redis_trigger["authenticationRef"]["name"])
    assert [r["parameter"] for r in auth["spec"]["secretTargetRef"]] == ["password"]
    query = triggers["prometheus"]["metadata"]["query"]
    assert query == "sum(bgswap_rows_held) + 100 * sum(bgswap_queue_messages)"
    from worker.metrics import series_names

    assert metric_names(query) <= series_names()


def test_the_queue_name_is_the_redis_list_celery_publishes_to(
    redis_client: redis_lib.Redis, redis_url: str
) -> None:
    import worker.tasks
    from worker.celery_app import QUEUE, app

    assert redis_client.llen(QUEUE) == 0
    with app.connection_for_write(redis_url) as conn:
        worker.tasks.process_row.apply_async(args=("b-deploy", 0), connection=conn)
    assert redis_client.type(QUEUE) == "list"
    assert redis_client.llen(QUEUE) == 1
    body = json.loads(redis_client.lindex(QUEUE, 0) or "{}")
    assert body["headers"]["task"] == worker.tasks.process_row.name


# -- compose ---------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return data


def env_example_names() -> set[str]:
    names = set()
    for line in (DEPLOY / "bgswap.env.example").read_text().splitlines():
        m = re.fullmatch(r"#\s*([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if m:
            names.add(m.group(1))
    return names


def test_the_env_example_names_settings_and_holds_no_value() -> None:
    text = (DEPLOY / "bgswap.env.example").read_text()
    names = env_example_names()
    assert {"RUNWARE_API_KEY", "FAL_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= names
    assert "REDIS_PASSWORD" in names
    for name in names:
        check_env_name(name)
    for line in text.splitlines():
        # Every line is a comment (a name is uncommented when given its value) ...
        assert not line.strip() or line.startswith("#"), line
        # ... and a name's line has nothing after its '='.
        m = re.fullmatch(r"#\s*([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if m:
            assert m.group(2) == "", line


def test_the_env_file_is_ignored_by_git() -> None:
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    out = subprocess.run(
        [git, "check-ignore", "--no-index", "-q", "deploy/bgswap.env"], cwd=REPO, check=False
    )
    assert out.returncode == 0, "deploy/bgswap.env must be in .gitignore"
    tracked = subprocess.run(
        [git, "ls-files", "deploy/bgswap.env"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert tracked.stdout == ""


def test_compose_services_run_entry_points_with_settings() -> None:
    services = compose()["services"]
    ours = {name: s for name, s in services.items() if bgswap_image(s.get("image", ""))}
    assert set(ours) == {"worker", "beat", "api"}
    for name, service in ours.items():
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        assert service["env_file"] == ["bgswap.env"], name
        check_command(service["command"])
        for var in service["environment"]:
            check_env_name(var)
        health = service["healthcheck"]["test"]
        assert health[0] == "CMD"
        if health[1] == "bgswap":
            check_command(health[1:])
    assert ours["worker"]["command"] == ["celery", "-A", "worker", "-q", "worker", "-E"]
    assert ours["worker"]["deploy"]["replicas"] == 2
    assert ours["worker"]["healthcheck"]["test"][1:] == ["bgswap", "health", "--this-host"]
    assert ours["beat"]["command"] == ["celery", "-A", "worker", "-q", "beat"]
    grace = ours["worker"]["stop_grace_period"]
    assert int(grace.removesuffix("s")) >= 180
    # The API's healthcheck asks a real route on the port it serves.
    api = ours["api"]
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", " ".join(api["healthcheck"]["test"]))
    assert url is not None
    assert url.group(1) == option(api["command"], "--port")
    assert url.group(2) in routes()
    assert f"{url.group(1)}:{url.group(1)}" in api["ports"]
    environment = ours["worker"]["environment"]
    assert environment["BGSWAP_METRICS_PORT"] == "9808"
    assert environment["BGSWAP_METRICS_HOST"] == "0.0.0.0"


def test_compose_redis_and_flower() -> None:
    data = compose()
    services = data["services"]
    redis_service = services["redis"]
    conf = redis_service["command"][1]
    assert redis_service["command"][0] == "redis-server"
    assert f"./redis.conf:{conf}:ro" in redis_service["volumes"]
    volume = next(v for v in redis_service["volumes"] if v.endswith(":/data"))
    assert volume.split(":")[0] in data["volumes"]
    broker = services["worker"]["environment"]["BGSWAP_BROKER_URL"]
    assert broker == "redis://redis:6379/0"
    flower = services["flower"]
    assert flower["image"].startswith("mher/flower")
    assert f"--broker={broker}" in flower["command"]
    assert "flower" in flower["command"]


# -- the dashboard ---------------------------------------------------------------------

PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "le", "inf", "nan",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads (histogram and summary suffixes stripped);
    anything else that is not a function, keyword or label name is an error."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges ($__rate_interval, 5m, 1h)
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", text)  # grouping labels
    text = re.sub(r"\boffset\s+-?[0-9a-z]+", "", text)  # offsets
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = m.group(0)
        rest = text[m.end() :].lstrip()
        if rest.startswith("(") or word.lower() in PROMQL_WORDS:
            continue  # a function (rate, sum, histogram_quantile, time, ...) or a keyword
        names.add(re.sub(r"_(bucket|sum|count)$", "", word))
    return names


def dashboard_exprs() -> list[str]:
    data = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []))
            walk(panel.get("panels", []))

    walk(data["panels"])
    return exprs


def test_metric_names_reads_promql() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, provider) (rate(a_b_bucket{x="y"}[5m])))'
        " / ignoring (q) c_total offset 1h + time()"
    )
    assert metric_names(expr) == {"a_b", "c_total"}


def test_the_dashboard_reads_every_metric_and_only_those() -> None:
    from worker.metrics import series_names

    exprs = dashboard_exprs()
    assert exprs
    used: set[str] = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, expr
        assert names <= series_names(), f"{expr}: {names - series_names()}"
        used |= names
    assert used == series_names()
    # Quantiles come from the histograms' buckets.
    for expr in exprs:
        if "histogram_quantile" in expr:
            assert "_bucket" in expr and "le" in expr, expr


# -- the docs --------------------------------------------------------------------------


def test_deploy_readme_names_only_files_that_exist() -> None:
    text = (DEPLOY / "README.md").read_text()
    paths = set(re.findall(r"`((?:deploy|docs|tests|worker|producer)/[\w./-]*\w)`", text))
    assert len(paths) > 5
    for path in paths - {"deploy/bgswap.env"}:  # the one the reader makes (gitignored)
        assert (REPO / path).exists(), path
    assert "../" not in text
    from producer.cli import app

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    for command in re.findall(r"(?:^|`|\bapi |--rm bgswap )bgswap ([a-z][a-z-]*)", text, re.M):
        assert command in commands, f"bgswap {command}"
