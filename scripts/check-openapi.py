#!/usr/bin/env python3
"""Check web/openapi.json against the warp router.

1. Validates the document as OpenAPI (openapi-spec-validator: `pip install openapi-spec-validator`).
2. Extracts every (method, path) the router serves from src/http/mod.rs and src/http/ops.rs and
   checks that the document describes exactly those operations, and that exactly the routes
   that read the admin token (`auth()`) carry the `bearerAuth` security requirement.

The extraction is a plain regex reading of the code as it is written: each `let NAME = EXPR;`
whose EXPR contains `warp::get()/post()/put()/delete()` is a route. Its path is the path of the
`let` it starts from (`pools`, `base()`), then `warp::path("x")` and `warp::path!(a / b / String)`
segments in order (`String` is a parameter); `warp::path!(...).or(warp::path::end())` serves
both that path and `/`. Path parameters are compared by position only (`{pool}` == `{id}`).
The CORS preflight (OPTIONS on any path) is not a route of its own.

Usage: python3 scripts/check-openapi.py   (from anywhere; exits 1 listing every mismatch)
"""

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "web" / "openapi.json"
ROUTER_FILES = [ROOT / "src" / "http" / "mod.rs", ROOT / "src" / "http" / "ops.rs"]
METHODS = ("get", "post", "put", "delete")

LET = re.compile(r"\blet\s+(?:mut\s+)?(\w+)\s*=\s*(.*?);", re.S)
FN = re.compile(r"^(?:pub(?:\([^)]*\))?\s+)?(?:async\s+)?fn\s+\w+", re.M)
SEGMENT = re.compile(r'warp::path\("([^"]*)"\)|warp::path!\(([^)]*)\)|warp::path::end\(\)')
METHOD = re.compile(r"warp::(get|post|put|delete)\(\)")
PATH_OR_END = re.compile(r"warp::path!\(([^)]*)\)\s*\.or\(\s*warp::path::end\(\)\s*\)")


def macro_segments(args):
    out = []
    for part in args.split("/"):
        part = part.strip()
        if not part:
            continue
        if part.startswith('"') and part.endswith('"'):
            out.append(part[1:-1])
        else:  # a typed segment such as String or u64
            out.append("{}")
    return out


def segments_of(expr, env):
    """Alternative segment lists an expression matches (more than one only with `.or(path::end())`)."""
    head = re.match(r"\s*(\w+)\s*(\(\s*\))?", expr)
    prefix = env.get(head.group(1), [[]]) if head else [[]]
    alts = []
    m = PATH_OR_END.search(expr)
    if m:
        alts = [macro_segments(m.group(1)), []]
        expr = expr[: m.start()] + expr[m.end():]
    own = []
    for lit, macro in (x.groups() for x in SEGMENT.finditer(expr)):
        if lit is not None:
            own.append(lit)
        elif macro is not None:
            own.extend(macro_segments(macro))
    if not alts:
        alts = [[]]
    return [p + own + a for p in prefix for a in alts]


def router_routes():
    """{(method, path): admin} from the router source."""
    routes, problems = {}, []
    for f in ROUTER_FILES:
        src = f.read_text()
        starts = [m.start() for m in FN.finditer(src)] + [len(src)]
        for a, b in zip(starts, starts[1:]):
            body = src[a:b]
            env = {}
            for m in LET.finditer(body):
                name, expr = m.group(1), m.group(2)
                methods = METHOD.findall(expr)
                segs = segments_of(expr, env)
                if not methods:
                    if SEGMENT.search(expr) or (re.match(r"\s*(\w+)", expr) and re.match(r"\s*(\w+)", expr).group(1) in env):
                        env[name] = segs
                    continue
                if len(set(methods)) != 1:
                    problems.append(f"{f.name}: route `{name}` has several methods {methods}; cannot read it")
                    continue
                if not re.search(r"\b%s\b" % re.escape(name), body[m.end():]):
                    problems.append(f"{f.name}: route `{name}` is defined but never mounted")
                    continue
                admin = "auth()" in expr
                for s in segs:
                    key = (methods[0], "/" + "/".join(s))
                    if key in routes:
                        problems.append(f"{f.name}: {key[0].upper()} {key[1]} is defined twice")
                    routes[key] = admin
    return routes, problems


def normalize(path):
    return re.sub(r"\{[^}]*\}", "{}", path)


def doc_routes(doc):
    out = {}
    global_sec = doc.get("security")
    for path, item in doc.get("paths", {}).items():
        for method in METHODS + ("head", "options", "patch", "trace"):
            if method in item:
                op = item[method]
                sec = op.get("security", global_sec) or []
                out[(method, normalize(path))] = (path, any("bearerAuth" in s for s in sec))
    return out


def main():
    errors = []
    doc = json.loads(DOC.read_text())
    try:
        from openapi_spec_validator import validate
    except ImportError:
        print("openapi-spec-validator is missing: pip install openapi-spec-validator", file=sys.stderr)
        return 2
    try:
        validate(doc)
    except Exception as e:  # the validator's own error types vary by version
        errors.append(f"invalid OpenAPI document: {e}")

    routes, problems = router_routes()
    errors += problems
    if not routes:
        errors.append("no routes found in the router source: the extraction regex needs updating")
    documented = doc_routes(doc)
    for key in sorted(set(routes) - set(documented)):
        errors.append(f"served but not documented: {key[0].upper()} {key[1]}")
    for key in sorted(set(documented) - set(routes)):
        errors.append(f"documented but not served: {key[0].upper()} {documented[key][0]}")
    for key in sorted(set(routes) & set(documented)):
        admin, (path, secured) = routes[key], documented[key]
        if admin and not secured:
            errors.append(f"admin route without bearerAuth in the document: {key[0].upper()} {path}")
        if secured and not admin:
            errors.append(f"bearerAuth on a route that takes no token: {key[0].upper()} {path}")

    if errors:
        print("\n".join(errors), file=sys.stderr)
        print(f"FAIL: {len(errors)} problem(s)", file=sys.stderr)
        return 1
    n_admin = sum(routes.values())
    print(f"ok: {len(routes)} operations on {len({p for _, p in routes})} paths match the router ({n_admin} admin)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
