"""Access control for private instances: htpasswd basic auth and bearer tokens."""
from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import bcrypt
from treq.testing import StubTreq

from nixeryd.core.offload import inline
from nixeryd.http.auth import Authenticator, parse_htpasswd, parse_tokens
from nixeryd.http.registry import RegistryAPI
from tests.daemon import TWISTD, Daemon, daemon_environment
from tests.test_api import APITestCase


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


HTPASSWD = "ci:" + bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode().replace("$2b$", "$2y$", 1) + "\n" \
    + "old:{SHA}" + base64.b64encode(__import__("hashlib").sha1(b"legacy").digest()).decode() + "\n"


class AuthTests(APITestCase):
    def api(self, users: str = "", tokens: str = "") -> StubTreq:
        from nixeryd.build.builder import ImageBuilder
        from nixeryd.build.pkgsource import PathSource
        from nixeryd.registry.images import Images

        source = PathSource("/srv/pkgs")
        builder = ImageBuilder(nix=self.nix, storage=self.storage, offload=inline, source=source,
                               clock=self.clock, popularity={})
        auth = Authenticator(parse_htpasswd(users, "htpasswd"), parse_tokens(tokens), inline, self.clock)
        images = Images(builder, self.storage, source, self.clock)
        return StubTreq(RegistryAPI(images, self.storage, (), auth=auth).resource())

    def call(self, treq: StubTreq, path: str, authorization: str | None = None) -> tuple[Any, bytes]:
        headers = {"Authorization": [authorization]} if authorization else {}
        return self.fetch(treq, path, headers=headers)

    def test_basic_auth(self) -> None:
        """Without valid credentials /v2/ is a 401 with a Basic challenge; with them, 200."""
        treq = self.api(users=HTPASSWD)
        for authorization in [None, basic("ci", "wrong"), basic("nobody", "s3cret"), "Basic !!!",
                              "Bearer s3cret", basic("ci", "")]:
            response, body = self.call(treq, "/v2/", authorization)
            self.assertEqual(response.code, 401, authorization)
            self.assertEqual(json.loads(body)["errors"][0]["code"], "UNAUTHORIZED")
            self.assertEqual(response.headers.getRawHeaders("WWW-Authenticate"),
                             ['Basic realm="nixeryd", charset="UTF-8"'])
        self.assertEqual(self.call(treq, "/v2/", basic("ci", "s3cret"))[0].code, 200)
        self.assertEqual(self.call(treq, "/v2/", basic("old", "legacy"))[0].code, 200)
        response, _ = self.call(treq, "/v2/alpha/manifests/latest", basic("ci", "s3cret"))
        self.assertEqual(response.code, 200)
        self.assertEqual(self.call(treq, "/v2/alpha/manifests/latest")[0].code, 401)
        self.assertEqual(self.call(treq, "/healthz")[0].code, 200)

    def test_every_route_declares_who_may_call_it(self) -> None:
        """Each route of the API is declared authorized or public with the route itself; the
        public ones are exactly the index, probes, metrics, the book and refusals of writes,
        and every authorized one answers 401 without credentials."""
        from nixeryd.http.access import AUTHORIZED, PUBLIC

        declared = {}
        for rule in RegistryAPI.app.url_map.iter_rules():
            # Klein names what is below a branch route "<handler>_branch".
            access = getattr(getattr(RegistryAPI, rule.endpoint.removesuffix("_branch")), "access", None)
            self.assertIn(access, (AUTHORIZED, PUBLIC), rule.rule)
            declared[(rule.rule, tuple(sorted(rule.methods or ())))] = access
        public = {rule for (rule, _), access in declared.items() if access == PUBLIC}
        self.assertEqual(public, {"/", "/healthz", "/metrics", "/docs/", "/docs/<path:__rest__>", "/v2/",
                                  "/v2/<path:rest>"})
        self.assertTrue(all(access == AUTHORIZED for (rule, methods), access in declared.items()
                            if "GET" in methods and rule.startswith(("/v2", "/image"))))
        treq = self.api(users=HTPASSWD)
        for path in ("/v2/", "/v2/alpha/manifests/latest", "/v2/_catalog", "/v2/alpha/tags/list",
                     "/image/alpha", "/v2/alpha/blobs/sha256:" + "a" * 64,
                     "/v2/alpha/referrers/sha256:" + "a" * 64):
            self.assertEqual(self.call(treq, path)[0].code, 401, path)
        # The book holds nothing of the instance: open, here not built (404), never 401.
        self.assertEqual(self.call(treq, "/docs/index.html")[0].code, 404)

    def test_an_unknown_user_costs_what_a_wrong_password_does(self) -> None:
        """A refusal takes one bcrypt check at the users' cost whether the user exists or
        not: timing says nothing of who exists."""
        from twisted.internet.defer import succeed

        from nixeryd.http.auth import _password_matches

        checked: list[str] = []

        def counting(fn: Any, password: str, hashed: str) -> Any:
            checked.append(hashed)
            return succeed(_password_matches(password, hashed))

        auth = Authenticator(parse_htpasswd(HTPASSWD, "htpasswd"), frozenset(), counting, self.clock)
        for authorization in (basic("ci", "wrong"), basic("nobody", "wrong")):
            self.assertFalse(self.successResultOf(auth.check(authorization.encode())))
        known, unknown = checked
        self.assertTrue(known.startswith("$2") and unknown.startswith("$2"))
        self.assertEqual(known[:7].replace("$2y$", "$2b$"), unknown[:7])  # the same cost
        self.assertFalse(self.successResultOf(auth.check(basic("nobody", "\0decoy").encode())))

    def test_a_flood_of_logins_is_answered_429(self) -> None:
        """Past 32 password checks under way, another login is 429 with Retry-After at once,
        rather than queued behind them; when they end, logins go through again."""
        from twisted.internet.defer import Deferred

        from nixeryd.http.auth import _password_matches

        pending: list[tuple[Deferred[bool], str, str]] = []

        def held(fn: Any, password: str, hashed: str) -> Deferred[bool]:
            d: Deferred[bool] = Deferred()
            pending.append((d, password, hashed))
            return d

        auth = Authenticator(parse_htpasswd(HTPASSWD, "htpasswd"), frozenset(), held, self.clock)
        from nixeryd.build.builder import ImageBuilder
        from nixeryd.build.pkgsource import PathSource
        from nixeryd.registry.images import Images

        source = PathSource("/srv/pkgs")
        builder = ImageBuilder(nix=self.nix, storage=self.storage, offload=inline, source=source,
                               clock=self.clock, popularity={})
        treq = StubTreq(RegistryAPI(Images(builder, self.storage, source, self.clock), self.storage, (),
                                    auth=auth).resource())
        waiting = [treq.get("http://r/v2/", headers={"Authorization": [basic("ci", f"wrong{i}")]})
                   for i in range(32)]
        treq.flush()
        response, body = self.call(treq, "/v2/", basic("ci", "s3cret"))
        self.assertEqual((response.code, json.loads(body)["errors"][0]["code"]), (429, "TOOMANYREQUESTS"))
        self.assertEqual(response.headers.getRawHeaders("Retry-After"), ["1"])
        for d, password, hashed in pending:
            d.callback(_password_matches(password, hashed))
        treq.flush()
        self.assertTrue(all(self.successResultOf(w).code == 401 for w in waiting))
        pending.clear()
        login = treq.get("http://r/v2/", headers={"Authorization": [basic("ci", "s3cret")]})
        treq.flush()
        (d, password, hashed), = pending
        d.callback(_password_matches(password, hashed))
        treq.flush()
        self.assertEqual(self.successResultOf(login).code, 200)

    def test_a_wrong_password_is_refused_every_time(self) -> None:
        """A wrong password is refused on its second try too (grants are remembered, never
        refusals), and a right one after it is let in."""
        treq = self.api(users=HTPASSWD)
        for _ in range(3):
            self.assertEqual(self.call(treq, "/v2/", basic("ci", "wrong"))[0].code, 401)
        self.assertEqual(self.call(treq, "/v2/", basic("ci", "s3cret"))[0].code, 200)
        self.assertEqual(self.call(treq, "/v2/", basic("ci", "s3cret"))[0].code, 200)
        self.assertEqual(self.call(treq, "/v2/", basic("ci", "wrong"))[0].code, 401)

    def test_bearer_tokens(self) -> None:
        """A static bearer token from the list lets a request in; any other does not."""
        treq = self.api(tokens="# deploy tokens\nabc123\n")
        self.assertEqual(self.call(treq, "/v2/", "Bearer abc123")[0].code, 200)
        response, _ = self.call(treq, "/v2/", "Bearer abc124")
        self.assertEqual(response.code, 401)
        self.assertEqual(response.headers.getRawHeaders("WWW-Authenticate"), ['Bearer realm="nixeryd"'])

    def test_hostile_credentials_are_401(self) -> None:
        """A password past bcrypt's 72 bytes (bcrypt 5 raises on it) and a bearer token with
        bytes outside ASCII are refused with a 401, not a 500."""
        treq = self.api(users=HTPASSWD, tokens="abc123\n")
        long_password = basic("ci", "s3cret" + "x" * 100)
        raw_bearer = "Bearer abc\u00e9\u00ff123"
        for authorization in [long_password, raw_bearer, basic("ci", "\u00e9" * 80)]:
            response, body = self.call(treq, "/v2/", authorization)
            self.assertEqual(response.code, 401, authorization)
            self.assertEqual(json.loads(body)["errors"][0]["code"], "UNAUTHORIZED")
        self.assertEqual(self.call(treq, "/v2/", basic("ci", "s3cret"))[0].code, 200)

    def test_off_by_default(self) -> None:
        """With nothing configured every request is let in."""
        self.assertEqual(self.call(self.api(), "/v2/")[0].code, 200)

    def test_unsupported_hashes_are_refused(self) -> None:
        """An htpasswd line with a hash kind not supported is an error naming the line."""
        with self.assertRaises(ValueError) as error:
            parse_htpasswd("ok:{SHA}x\nbad:$apr1$abc$def\n", "users")
        self.assertIn("users:2", str(error.exception))


def test_skopeo_with_credentials(tmp_path: Path) -> None:
    """skopeo pulls from a private instance with --src-creds and is refused without."""
    users = tmp_path / "htpasswd"
    users.write_text(HTPASSWD)
    env = daemon_environment(tmp_path / "s", NIXERY_HTPASSWD=str(users))
    daemon = Daemon(tmp_path / "s", env).start()
    try:
        ref = f"docker://{daemon.registry}/hello:latest"
        refused = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--no-creds", ref],
                                 capture_output=True, text=True, timeout=120)
        allowed = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--creds", "ci:s3cret", ref],
                                 capture_output=True, text=True, timeout=120)
    finally:
        daemon.stop()
    assert refused.returncode != 0
    assert "401" in refused.stderr or "unauthorized" in refused.stderr.lower(), refused.stderr
    assert allowed.returncode == 0, allowed.stderr


def test_bad_access_files_stop_start_up(tmp_path: Path) -> None:
    """A missing or empty access file stops start-up with one line naming its setting."""
    empty = tmp_path / "empty"
    empty.write_text("# nobody\n")
    for variable, value in [("NIXERY_HTPASSWD", str(tmp_path / "missing")),
                            ("NIXERY_TOKENS_FILE", str(empty))]:
        env = daemon_environment(tmp_path / "s", **{variable: value})
        result = subprocess.run([str(TWISTD), "--nodaemon", "--pidfile=", "nixeryd"], env=env,
                                capture_output=True, text=True, timeout=60)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode != 0 and len(lines) == 1 and variable in lines[0], result.stderr
