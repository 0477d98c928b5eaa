#!/usr/bin/env python3
"""Deployment checks of `make test` (issue 8, SPEC 6 OPS-1..OPS-4).

Run by scripts/check-deploy.sh, which provides HELM, KUBECTL and a Python with
kubernetes-validate. Every check prints one line; any failure exits 1 with
the reasons.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "retention"
HELM = os.environ["HELM"]
KUBECTL = os.environ["KUBECTL"]
KUBE_VERSIONS = ["1.30.0", "1.33.0"]
SERVICES = ["profiles", "segmentation", "outreach", "feedback", "analytics"]
# Values needed when nothing else is given: the chart refuses to render without them.
MINIMAL = [
    "--set", "postgresql.url=postgres://crm@postgres:5432/crm",
    "--set", "redis.url=redis://redis:6379",
    "--set", "jwt.secret=0123456789abcdef0123456789abcdef",
]
# Kinds of the prometheus-operator CRDs: not in the Kubernetes schemas, checked by shape here.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}

failures = []
passed = 0
VERBOSE = os.environ.get("CHECK_VERBOSE") == "1"


def check(ok, what, detail=""):
    """Records one check; prints failures (and passes with CHECK_VERBOSE=1)."""
    global passed
    if ok:
        passed += 1
        if VERBOSE:
            print("ok   " + what)
    else:
        print("FAIL " + what + (f": {detail}" if detail else ""))
        failures.append(what)
    return ok


def run(*args, expect_ok=True):
    p = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    if expect_ok and p.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, args))} failed:\n{p.stdout}\n{p.stderr}")
    return p


def docs(text):
    return [d for d in yaml.safe_load_all(text) if d]


def key(doc):
    return (doc["kind"], doc["metadata"]["name"])


def render(*values):
    return docs(run(HELM, "template", "crm", str(CHART), *values).stdout)


def by_kind(objs, kind):
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


# --- 1. helm lint --strict ----------------------------------------------------
for label, values in [("minimal values", MINIMAL), ("production values", ["-f", str(CHART / "values-production.yaml")])]:
    p = run(HELM, "lint", "--strict", str(CHART), *values, expect_ok=False)
    check(p.returncode == 0, f"helm lint --strict ({label})", p.stdout[-2000:] + p.stderr[-2000:])

# --- 2. values.schema.json rejects typos and bad values ------------------------
for bad in ["services.profiles.replicsa=3", "defaults.hpa.maxReplicas=zero", "telemetry.logFormat=xml",
            "services.outreach.env.lower-case=1", "image.pullPolicy=Sometimes"]:
    p = run(HELM, "template", "crm", str(CHART), *MINIMAL, "--set", bad, expect_ok=False)
    check(p.returncode != 0 and "schema" in p.stderr, f"values.schema.json rejects {bad}", p.stderr.strip()[:300])
p = run(HELM, "template", "crm", str(CHART), expect_ok=False)
check(p.returncode != 0 and "postgresql.url or postgresql.existingSecret" in p.stderr,
      "rendering without a database fails naming postgresql.url", p.stderr.strip()[:300])

# --- 3. renders, validated against the Kubernetes schemas ----------------------
renders = {
    "default": render(*MINIMAL),
    "production": render("-f", str(CHART / "values-production.yaml")),
}


def validate(label, objs):
    for version in KUBE_VERSIONS:
        errors = []
        for o in objs:
            if o["kind"] in CRD_KINDS:
                continue
            try:
                kubernetes_validate.validate(o, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                errors.append(f"{o['kind']}/{o['metadata']['name']}: {e.message} at {list(e.path)}")
            except kubernetes_validate.SchemaNotFoundError as e:
                errors.append(e.message)
        check(not errors, f"{label}: {len(objs)} objects valid for Kubernetes {version} (strict)", "; ".join(errors[:5]))


for label, objs in renders.items():
    validate(f"helm template ({label} values)", objs)

# --- 4. every service: probes, resources, security, PDB, HPA ----------------------
GRPC_SERVICE = re.compile(r"^crm\.[a-z]+\.v1\.[A-Za-z]+Service$")


def service_checks(label, objs, hooks=True):
    deployments = by_kind(objs, "Deployment")
    pdbs = list(by_kind(objs, "PodDisruptionBudget").values())
    hpas = list(by_kind(objs, "HorizontalPodAutoscaler").values())
    jobs = list(by_kind(objs, "Job").values())
    svcs = by_kind(objs, "Service")
    policies = by_kind(objs, "NetworkPolicy")
    for service in SERVICES:
        name = f"crm-retention-{service}"
        d = deployments.get(name)
        if not check(d is not None, f"{label}: Deployment {name}"):
            continue
        pod = d["spec"]["template"]["spec"]
        labels = d["spec"]["template"]["metadata"]["labels"]
        c = pod["containers"][0]
        port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
        probes = {k: c.get(k, {}) for k in ("startupProbe", "readinessProbe", "livenessProbe")}
        check(all(p.get("grpc", {}).get("port") == port for p in probes.values()),
              f"{label}: {service} has native gRPC startup, readiness and liveness probes on its port", str(probes))
        check(GRPC_SERVICE.match(probes["readinessProbe"].get("grpc", {}).get("service", "")) is not None
              and probes["livenessProbe"].get("grpc", {}).get("service") == "liveness",
              f"{label}: {service} readiness asks for its gRPC service, liveness for `liveness`", str(probes))
        res = c.get("resources", {})
        check(all(res.get(k, {}).get(r) for k in ("requests", "limits") for r in ("cpu", "memory")),
              f"{label}: {service} has CPU and memory requests and limits", str(res))
        sc, psc = c.get("securityContext", {}), pod.get("securityContext", {})
        check(psc.get("runAsNonRoot") is True and sc.get("readOnlyRootFilesystem") is True
              and sc.get("allowPrivilegeEscalation") is False and sc.get("capabilities", {}).get("drop") == ["ALL"]
              and psc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
              f"{label}: {service} runs non-root, read-only, no capabilities, seccomp RuntimeDefault", f"{psc} {sc}")
        check(bool(pod.get("topologySpreadConstraints")), f"{label}: {service} spreads over zones and nodes")
        check(pod.get("serviceAccountName") in by_kind(objs, "ServiceAccount"), f"{label}: {service} has its ServiceAccount")

        def selects(obj):
            want = obj["spec"]["selector"]["matchLabels"]
            return all(labels.get(k) == v for k, v in want.items())
        check(any(selects(p) for p in pdbs), f"{label}: {service} has a PodDisruptionBudget")
        hpa = [h for h in hpas if h["spec"]["scaleTargetRef"]["name"] == name]
        check(len(hpa) == 1 and hpa[0]["spec"]["minReplicas"] >= 2, f"{label}: {service} has an HPA with at least 2 replicas",
              str([h["spec"] for h in hpa]))
        check(name in svcs and name in policies, f"{label}: {service} has a Service and a NetworkPolicy")
        env = {e["name"] for e in c.get("env", [])}
        if hooks:
            job = [j for j in jobs if j["spec"]["template"]["spec"]["containers"][0]["args"] == ["migrate"]
                   and j["metadata"]["name"].endswith(f"-{service}-migrate")]
            check(len(job) == 1 and "pre-install" in job[0]["metadata"]["annotations"].get("helm.sh/hook", "")
                  and "pre-upgrade" in job[0]["metadata"]["annotations"].get("helm.sh/hook", ""),
                  f"{label}: {service} migrates in a pre-install/pre-upgrade Job ({service} migrate)")
            if job and name in svcs:
                job_labels = job[0]["spec"]["template"]["metadata"]["labels"]
                sel = svcs[name]["spec"]["selector"]
                check(not all(job_labels.get(k) == v for k, v in sel.items()),
                      f"{label}: {service}'s Service never routes to its migration Job", str(sel))
            check({e["value"] for e in c["env"] if e["name"] == "MIGRATE_ON_START"} == {"false"},
                  f"{label}: {service} does not migrate on start when the Job does")
        check({"DATABASE_URL", "REDIS_URL", "JWT_SECRET_FILE"} <= env, f"{label}: {service} gets its database, Redis and JWT key")


service_checks("default", renders["default"])
service_checks("production", renders["production"])
prod = renders["production"]
check(len(by_kind(prod, "ServiceMonitor")) == 1 and len(by_kind(prod, "PrometheusRule")) == 1,
      "production: ServiceMonitor and PrometheusRule rendered")
check(all(e.get("value", "").startswith("http://crm-retention-otel-collector:4317")
          for d in by_kind(prod, "Deployment").values() if d["metadata"]["name"] != "crm-retention-otel-collector"
          for e in d["spec"]["template"]["spec"]["containers"][0]["env"] if e["name"] == "OTEL_EXPORTER_OTLP_ENDPOINT")
      and "crm-retention-otel-collector" in by_kind(prod, "Deployment"),
      "production: services export spans to the bundled collector")

# --- 5. NetworkPolicies allow only the architecture's calls ------------------------
# Calls between services (SPEC 2): feedback -> profiles, outreach; outreach -> profiles,
# feedback (consent and open complaints at hand-off, REL-6).
CALLS = {("feedback", "profiles"), ("feedback", "outreach"), ("outreach", "profiles"), ("outreach", "feedback")}
for label, objs in renders.items():
    policies = by_kind(objs, "NetworkPolicy")
    allowed = set()
    for callee in SERVICES:
        p = policies.get(f"crm-retention-{callee}")
        if not p:
            continue
        for rule in p["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                caller = peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name")
                if caller in SERVICES:
                    allowed.add((caller, callee))
        check("Ingress" in p["spec"]["policyTypes"] and "Egress" in p["spec"]["policyTypes"],
              f"{label}: {callee}'s NetworkPolicy restricts ingress and egress")
    check(allowed == CALLS, f"{label}: service-to-service ingress is exactly {sorted(CALLS)}", str(sorted(allowed)))

# --- 6. every environment variable is documented -----------------------------------
doc = (ROOT / "docs" / "configuration.md").read_text()
documented = set(re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", doc, re.M))
read = set()
sources = list((ROOT / "kit" / "src").rglob("*.rs")) + list((ROOT / "services").glob("*/src/**/*.rs"))
for f in sources:
    # Test helpers and developer tools (crm-token) are not the services.
    if "testing" in f.name or f.parent.name == "bin":
        continue
    text = f.read_text()
    read |= set(re.findall(r"(?:env\.\w+|\braw|\burl|ConfigError::new|\bvar)\(\s*\"([A-Z][A-Z0-9_]+)\"", text))
check(len(read) > 40, f"found the variables the services read ({len(read)})")
check(read <= documented, "every variable the services read is in docs/configuration.md", str(sorted(read - documented)))
set_by_chart = set()
for objs in renders.values():
    for o in objs:
        spec = o.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []):
            if "otel" in c["name"]:
                continue
            set_by_chart |= {e["name"] for e in c.get("env", [])}
check(set_by_chart <= read, "every variable the chart sets is one the services read", str(sorted(set_by_chart - read)))
ops = (ROOT / "docs" / "operations.md").read_text()
check(all(f"`{v}`" in ops or f"`{v}`" in doc for v in set_by_chart), "variables the chart sets are explained")

# --- 7. alert rules name metrics the services export --------------------------------
rule = next(iter(by_kind(prod, "PrometheusRule").values()))
names = set()
for group in rule["spec"]["groups"]:
    for r in group["rules"]:
        names |= set(re.findall(r"\bcrm_[a-z_]+", r["expr"]))
registered = set()
for f in sources:
    text = f.read_text()
    registered |= set(re.findall(r"register\(\s*\"([a-z_]+)\"", text))
def base(metric):
    return re.sub(r"_(total|bucket|sum|count)$", "", metric[len("crm_"):])
check(bool(names) and all(base(n) in registered for n in names), f"alert rules use exported metrics ({len(names)})",
      str(sorted(n for n in names if base(n) not in registered)))
check(all(f"`{r['alert']}`" in ops for g in rule["spec"]["groups"] for r in g["rules"]),
      "every alert is explained in docs/operations.md")

# --- 8. kustomize base == chart; production overlay valid ----------------------------
base_values = ROOT / "k8s" / "values.yaml"
chart_out = sorted(render("-f", str(base_values)), key=key)
kustomized = docs(run(KUBECTL, "kustomize", str(ROOT / "k8s" / "base")).stdout)
same = [json.dumps(o, sort_keys=True) for o in chart_out] == [json.dumps(o, sort_keys=True) for o in sorted(kustomized, key=key)]
check(same, "kubectl kustomize k8s/base equals helm template -f k8s/values.yaml",
      "run scripts/render-k8s.sh (make k8s) after changing the chart or k8s/values.yaml")
validate("k8s/base", kustomized)
service_checks("k8s/base", kustomized, hooks=False)
overlay = docs(run(KUBECTL, "kustomize", str(ROOT / "k8s" / "overlays" / "production")).stdout)
validate("k8s/overlays/production", overlay)
service_checks("k8s/overlays/production", [o for o in overlay], hooks=False)
check(all(o["metadata"].get("namespace") == "crm" for o in overlay if o["kind"] != "Namespace"), "production overlay puts everything in namespace crm")

if failures:
    print(f"deployment checks: {len(failures)} failed, {passed} passed (CHECK_VERBOSE=1 lists them all)", file=sys.stderr)
    sys.exit(1)
print(f"deployment checks: all {passed} passed (helm lint, Kubernetes {' and '.join(KUBE_VERSIONS)} schemas, "
      "probes/resources/PDB/HPA, NetworkPolicies, kustomize == chart, documented variables and alerts)")
