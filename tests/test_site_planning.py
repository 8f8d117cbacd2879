"""Issue 13's pure parts as tables: tls, static and proxy.extra in; settings, sites, ops and steps out."""
import json
import os
from pathlib import Path

import pytest

from fabdeploy import certs, helper, plan, provisioning, render
from fabdeploy import phases as ph
from fabdeploy.errors import DeployError
from fabdeploy.layout import Layout
from fabdeploy.model import Bind, HostFacts
from fabdeploy.ops import Install, Link
from fabdeploy.settings import resolve

EXAMPLE = Path(__file__).resolve().parent.parent / "example"
ROOT = "/srv/guestbook"
NAMES = "guestbook.example www.guestbook.example"
ACME = {"tls": {"mode": "acme", "email": "ops@guestbook.example"}, "proxy": {"server_name": NAMES}}


def settings(**given):
    return resolve(given, EXAMPLE)


def merged(*parts):
    out: dict = {}
    for part in parts:
        for key, value in part.items():
            out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


# -- settings: each bad value refused at load, naming its key -----------------------------

MANUAL = {"mode": "manual", "cert": "chain.pem", "key": "key.pem"}
BAD_VALUES = [
    ("tls.mode", {"tls": {"mode": "letsencrypt"}}),
    ("tls.email", merged(ACME, {"tls": {"email": "ops@x; rm -rf /"}})),
    ("tls.directory", merged(ACME, {"tls": {"directory": "http://acme.example/dir"}})),
    ("tls.directory", merged(ACME, {"tls": {"directory": "https://acme.example/dir --agree-tos"}})),
    ("tls.port", merged(ACME, {"tls": {"port": 80}})),  # proxy.listen's
    ("tls.port", merged(ACME, {"tls": {"port": "443; id"}})),
    ("tls.hsts", merged(ACME, {"tls": {"hsts": "yes"}})),
    ("tls.cert", merged(ACME, {"tls": {"cert": "chain.pem"}})),  # not with acme
    ("tls.key", {"tls": {"mode": "manual", "cert": "chain.pem"}, "proxy": {"server_name": NAMES}}),
    ("tls.cert", {"tls": {"mode": "manual", "key": "key.pem"}, "proxy": {"server_name": NAMES}}),
    ("tls.ca", {"tls": {**MANUAL, "ca": "ca.pem"}, "proxy": {"server_name": NAMES}}),
    ("proxy.server_name", {"tls": {"mode": "acme"}}),  # _ with tls on
    ("proxy.server_name", {"tls": MANUAL}),
    ("proxy.server_name", merged(ACME, {"proxy": {"server_name": "*.guestbook.example"}})),  # http-01
    ("tls.mode", merged(ACME, {"proxy": {"kind": "apache"}})),
    ("tls.mode", {"tls": MANUAL, "proxy": {"kind": "none", "server_name": NAMES}}),
    ("static", {"static": "yes"}),
    ("static[static]", {"static": {"static": "static"}}),  # no leading /
    ("static[/static]", {"static": {"/static": "../etc"}}),
    ("static[/static]", {"static": {"/static": "/etc"}}),
    ("static[/s t]", {"static": {"/s t": "static"}}),
    ("static[/.well-known/x]", {"static": {"/.well-known/x": "static"}}),
    ("static", {"static": {"/a": "a", "/a/b": "b"}}),
    ("static", {"static": {"/static": "static"}, "proxy": {"kind": "apache"}}),
    ("proxy.extra.client_max_body_size",
     {"proxy": {"extra": {"client_max_body_size": "20m; access_log /etc/sudoers.d/x x"}}}),
    ("proxy.extra.client_max_body_size", {"proxy": {"extra": {"client_max_body_size": "20 m"}}}),
    ("proxy.extra.proxy_read_timeout", {"proxy": {"extra": {"proxy_read_timeout": "60s; include /x"}}}),
    ("proxy.extra.headers", {"proxy": {"extra": {"headers": {"X-A; include /etc/shadow;": "1"}}}}),
    ("proxy.extra.headers.X-Frame-Options",
     {"proxy": {"extra": {"headers": {"X-Frame-Options": 'DENY" always; include /etc/shadow; #'}}}}),
    ("proxy.extra.headers.X-Frame-Options", {"proxy": {"extra": {"headers": {"X-Frame-Options": "$hostname"}}}}),
    ("proxy.extra.headers.X-Frame-Options", {"proxy": {"extra": {"headers": {"X-Frame-Options": "a\nb"}}}}),
    ("proxy.extra.headers.X-Fabdeploy-Site", {"proxy": {"extra": {"headers": {"X-Fabdeploy-Site": "x"}}}}),
    ("proxy.extra.headers.Strict-Transport-Security",
     {"proxy": {"extra": {"headers": {"Strict-Transport-Security": "max-age=1"}}}}),
    ("proxy.extra.locations[/files/]", {"proxy": {"extra": {"locations": {"/files/": "/etc"}}}}),
    ("proxy.extra.locations[/files/]", {"proxy": {"extra": {"locations": {"/files/": "/var/log/nginx"}}}}),
    ("proxy.extra.locations[/files/]", {"proxy": {"extra": {"locations": {"/files/": "relative"}}}}),
    ("proxy.extra.locations[/files/]", {"proxy": {"extra": {"locations": {"/files/": "/srv/f; }"}}}}),
    ("proxy.extra.locations[/f {]", {"proxy": {"extra": {"locations": {"/f {": "/srv/f"}}}}),
    ("proxy.extra.locations", {"proxy": {"extra": {"locations": {"/static/x": "/srv/x"}}}}),  # in /static
    ("proxy.extra.include", {"proxy": {"extra": {"include": "/etc/shadow"}}}),
    ("proxy.extra.client_max_body_size", {"proxy": {"kind": "apache", "extra": {"client_max_body_size": "2m"}}}),
]


@pytest.mark.parametrize("key, given", BAD_VALUES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(BAD_VALUES)])
def test_a_bad_value_is_refused_at_load_naming_its_key(key, given):
    with pytest.raises(DeployError) as err:
        settings(**given)
    line = err.value.line()
    assert line.startswith((f"setting 'fabdeploy.{key}'", f"unknown setting 'fabdeploy.{key}'")), line
    assert "\n" not in str(err.value)


def test_tls_is_off_and_static_is_auto_by_default():
    s = settings()
    assert (s.tls.mode, s.tls.enabled, s.tls.hsts) == ("off", False, False)
    assert s.tls.directory == "https://acme-v02.api.letsencrypt.org/directory"
    assert [(d.prefix, d.folder, d.required) for d in s.static] == [("/static", "static", False)]
    assert s.proxy.extra.record() == {"client_max_body_size": None, "proxy_read_timeout": None,
                                      "headers": [], "locations": []}


@pytest.mark.parametrize("given, read", [
    (ACME, lambda s: s.tls.acme and "certbot" in s.provision.packages),
    ({"tls": {"mode": False}}, lambda s: not s.tls.enabled),  # YAML's bare `off`
    ({"static": False}, lambda s: s.static == ()),
    ({"static": "off"}, lambda s: s.static == ()),
    ({"proxy": {"kind": "apache"}}, lambda s: s.static == ()),  # auto: nginx serves them, or nobody
    ({"static": {"/assets/": "build/assets", "/media": "media"}},
     lambda s: [(d.prefix, d.folder, d.required) for d in s.static] == [("/assets", "build/assets", True),
                                                                        ("/media", "media", True)]),
    ({"tls": MANUAL, "proxy": {"server_name": "*.guestbook.example"}},  # a wildcard of your own is fine
     lambda s: s.tls.cert == str(EXAMPLE / "chain.pem") and s.tls.key == str(EXAMPLE / "key.pem")),
    ({"proxy": {"extra": {"client_max_body_size": "20m", "proxy_read_timeout": 120,
                          "headers": {"X-Frame-Options": "DENY", "Permissions-Policy": "camera=()"},
                          "locations": {"/downloads": "/srv/downloads/"}}}},
     lambda s: s.proxy.extra.record() == {
         "client_max_body_size": "20m", "proxy_read_timeout": 120,
         "headers": [["X-Frame-Options", "DENY"], ["Permissions-Policy", "camera=()"]],
         "locations": [["/downloads/", "/srv/downloads/"]]}),
])
def test_good_values_are_kept(given, read):
    assert read(settings(**given))


# -- the nginx site --------------------------------------------------------------------------

LIVE = Bind.unix(f"{ROOT}/shared/run/live.sock")


def site(s, ipv6=True, system=True) -> str:
    return render.proxy_site(s, render.SiteShape(release="", active=LIVE, backup=LIVE, ipv6=ipv6, root=ROOT,
                                                 system=system))


def servers(text: str) -> list[str]:
    """The site's server blocks, each as its text."""
    return ["server {" + block for block in text.split("\nserver {")[1:]]


def test_with_acme_port_80_answers_the_challenge_and_redirects_the_rest():
    http, https = servers(site(settings(**ACME)))
    assert "listen 80;" in http and "listen [::]:80;" in http and "ssl" not in http
    assert "location ^~ /.well-known/acme-challenge/ {\n        root /var/lib/fabdeploy/acme/guestbook;" in http
    assert "return 301 https://$host$request_uri;" in http
    assert "if ($request_method !~ ^(GET|HEAD)$) {\n            return 308 https://$host$request_uri;" in http
    assert "proxy_pass" not in http
    assert "listen 443 ssl http2;" in https and "listen [::]:443 ssl http2;" in https
    assert f"server_name {NAMES};" in http and f"server_name {NAMES};" in https
    assert "ssl_certificate /etc/fabdeploy/tls/guestbook/fullchain.pem;" in https
    assert "ssl_certificate_key /etc/fabdeploy/tls/guestbook/privkey.pem;" in https
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in https
    assert "proxy_set_header X-Forwarded-Proto $scheme;" in https
    assert "Strict-Transport-Security" not in https  # off unless asked
    v4_only = settings(**merged(ACME, {"proxy": {"listen": "10.0.0.5:80"}}))
    assert "listen 10.0.0.5:443 ssl http2;" in site(v4_only) and "[::]" not in site(v4_only)


def test_manual_mode_names_one_root_file_and_hsts_is_a_setting():
    s = settings(tls={**MANUAL, "hsts": True, "port": 8443}, proxy={"server_name": NAMES})
    http, https = servers(site(s))
    assert "acme-challenge" not in http
    assert "return 301 https://$host:8443$request_uri;" in http
    assert "listen 8443 ssl http2;" in https
    assert "ssl_certificate /etc/fabdeploy/tls/guestbook/bundle.pem;" in https
    assert "ssl_certificate_key /etc/fabdeploy/tls/guestbook/bundle.pem;" in https
    assert 'add_header Strict-Transport-Security "max-age=31536000" always;' in https


def test_without_tls_the_site_is_one_server_on_proxy_listen():
    text = site(settings(proxy={"server_name": NAMES}))
    assert len(servers(text)) == 1 and "ssl" not in text and "return 301" not in text


def test_static_files_come_from_current_then_previous_then_the_app():
    text = site(settings())
    location = text[text.index("location ^~ /static/ {"):]
    location = location[:location.index("}")]
    assert f"root {ROOT};" in location
    assert "try_files /current/public$uri /current/previous/public$uri @fabdeploy_guestbook;" in location
    assert "disable_symlinks if_not_owner from=$document_root;" in location
    assert "gzip_static on;" in location and "expires $fabdeploy_guestbook_expires;" in location
    assert "location @fabdeploy_guestbook {\n        proxy_pass http://fabdeploy_guestbook;" in text
    assert 'map $uri $fabdeploy_guestbook_expires {\n    default epoch;\n    "~[.-][0-9a-f]{8,}' in text
    nothing = site(settings(static=False))
    assert "try_files" not in nothing and "_expires" not in nothing and "location @" not in nothing


def test_root_logs_the_apps_requests_with_who_answered():
    text = site(settings(**ACME))
    assert text.count("access_log /var/log/nginx/guestbook.access.log fabdeploy_guestbook;") == 2
    assert "upstream=$upstream_addr';" in text
    assert "access_log" not in site(settings(), system=False)  # deploy_to may be deleted: never there


def test_proxy_extra_becomes_these_directives_and_nothing_else():
    s = settings(proxy={"extra": {"client_max_body_size": "20m", "proxy_read_timeout": 120,
                                  "headers": {"X-Frame-Options": "DENY"},
                                  "locations": {"/downloads": "/srv/downloads"}}})
    text = site(s)
    server = servers(text)[0]
    for line in ("    client_max_body_size 20m;\n", "    proxy_read_timeout 120s;\n",
                 '    add_header X-Frame-Options "DENY" always;\n',
                 "    location ^~ /downloads/ {\n        alias /srv/downloads/;\n"
                 "        disable_symlinks if_not_owner;\n    }\n"):
        assert line in server
    assert len(text) - len(site(settings())) == sum(len(line) for line in (
        "    client_max_body_size 20m;\n", "    proxy_read_timeout 120s;\n",
        '    add_header X-Frame-Options "DENY" always;\n',
        "    location ^~ /downloads/ {\n        alias /srv/downloads/;\n        disable_symlinks if_not_owner;\n    }\n"))


def test_apache_takes_your_certificate_through_mod_ssl():
    s = settings(tls=MANUAL, proxy={"kind": "apache", "server_name": NAMES})
    text = site(s)
    http, https = text.split("<VirtualHost ")[1:]
    assert http.startswith("*:80>") and "Redirect 301 \"https://%{SERVER_NAME}%{REQUEST_URI}\"" in http
    assert "Redirect 308" in http and "ProxyPass" not in http
    assert https.startswith("*:443>") and "SSLEngine on" in https
    assert "SSLCertificateFile /etc/fabdeploy/tls/guestbook/bundle.pem" in https
    assert "Protocols h2 http/1.1" in https and "ProxyPass \"/\"" in https


# -- deploying: static links, the release before, checks over TLS -------------------------------

def facts(**given) -> HostFacts:
    base = {"root": ROOT, "user": "deploy", "uid": 1000, "home": "/home/deploy", "root_exists": True}
    return HostFacts.parse({**base, **given})


class FakeHost:
    name = "deploy@web1"
    dry_run = False
    root = ROOT


def target(s=None, **fact_values) -> ph.Target:
    return ph.Target(FakeHost(), s or settings(), release="R2", facts=facts(**fact_values), layout=Layout(ROOT))


@pytest.mark.parametrize("given, wsgi, wanted", [
    ({}, "guestbook:create_app()",
     ['if [ -d "$1/"guestbook ]; then pkg="$1/"guestbook; else pkg="$1"; fi',
      'if [ -d "$pkg/"static ]; then mkdir -p public && ln -sfn "../$pkg/"static public/static; fi']),
    ({"static": {"/assets/img": "build/img"}}, "shop.web:app",
     ['if [ -d "$1/"shop/web ]; then pkg="$1/"shop/web; else pkg="$1"/shop; fi',
      'if [ -d "$pkg/"build/img ]; then mkdir -p public/assets && ln -sfn "../../$pkg/"build/img public/assets/img;'
      ' else echo "static: /assets/img -> build/img: no such folder in $pkg" >&2; exit 1; fi']),
])
def test_each_release_links_its_packages_static_folders(given, wsgi, wanted):
    s = settings(wsgi=wsgi, **given)
    command = plan.static_links(s, Layout(ROOT), "R2").cmd
    assert command == " && ".join([f"cd {ROOT}/releases/R2", "set -- venv/lib/python*/site-packages", *wanted])


def test_a_wsgi_module_reaches_the_shell_quoted():
    command = plan.static_links(settings(wsgi="app$(id):create()"), Layout(ROOT), "R2").cmd
    assert """if [ -d "$1/"'app$(id)' ]; then pkg="$1/"'app$(id)'; else pkg="$1"; fi""" in command


def test_a_release_links_the_one_it_replaces_and_a_rollback_the_one_it_leaves():
    first = ph.link_static(target())
    assert [type(op).__name__ for op in first] == ["Sh"]
    deployed = target(current="R1", releases=[{"name": "R1", "state": "ready"}])
    _, link = ph.link_static(deployed)
    assert isinstance(link, Link) and (link.link, link.target) == (f"{ROOT}/releases/R2/previous", "../R1")
    assert ph.serves_static(deployed) and not ph.serves_static(target(settings(static=False)))


def test_with_tls_the_proxy_is_checked_over_https_by_name():
    check = plan.health_via_proxy(settings(**ACME), "guestbook", 10)
    assert (check.target, check.tls, check.host_header) == ("127.0.0.1:443", True, "guestbook.example")
    assert check.wire()["tls"] is True and check.describe()[0].startswith("would check https://127.0.0.1:443/")
    plain = plan.health_via_proxy(settings(), "guestbook", 10)
    assert (plain.target, plain.tls, "tls" in plain.wire()) == ("127.0.0.1:80", False, False)


def test_tls_on_a_host_provision_never_set_up_stops_before_anything_changes():
    with pytest.raises(DeployError, match="tls needs a provisioned host"):
        ph.check_server(target(settings(**ACME)))


# -- provision: what root installs, in order ---------------------------------------------------

def root_facts(systemd=True) -> provisioning.RootFacts:
    return provisioning.RootFacts(user_exists=False, home="/home/deploy", sudo_rules=(), groups=(),
                                  sudoers_files={}, main_sudoers_lines=(), ipv6=True, systemd=systemd)


def step_names(s, facts=None) -> list[str]:
    return [step.name for step in provisioning.steps(s, "deploy", "ssh-ed25519 AAA op", facts or root_facts())]


def test_acme_steps_put_a_placeholder_before_the_site_and_ask_certbot_after_it(tmp_path):
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n")
    names = step_names(settings(**merged(ACME, {"tls": {"ca": str(tmp_path / "ca.pem")}})))
    order = ["TLS folder /etc/fabdeploy/tls/guestbook", "ACME webroot /var/lib/fabdeploy/acme/guestbook",
             "trusted CA /usr/local/share/ca-certificates/fabdeploy-guestbook.crt",
             "placeholder certificate until ACME's", "site /etc/nginx/sites-enabled/guestbook.conf",
             f"certificate for {NAMES} from https://acme-v02.api.letsencrypt.org/directory",
             "certbot.timer enabled"]
    assert [n for n in names if n in order] == order, names
    assert "certbot.timer enabled" not in step_names(settings(**ACME), root_facts(systemd=False))
    assert not any("TLS" in n or "certificate" in n for n in step_names(settings()))


def test_certbot_is_asked_for_exactly_the_sites_names_over_the_webroot():
    argv = certs.certbot_argv(settings(**merged(ACME, {"tls": {"directory": "https://acme.test:14000/dir"}})))
    assert argv[:4] == ["certbot", "certonly", "--non-interactive", "--agree-tos"]
    pairs = dict(zip(argv[4:], argv[5:]))
    assert pairs["--webroot-path"] == "/var/lib/fabdeploy/acme/guestbook" and pairs["--cert-name"] == "guestbook"
    assert pairs["--server"] == "https://acme.test:14000/dir" and pairs["--email"] == "ops@guestbook.example"
    assert pairs["--deploy-hook"] == "/usr/local/lib/fabdeploy/helper guestbook renewed"
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "-d"] == NAMES.split()
    no_mail = certs.certbot_argv(settings(tls={"mode": "acme"}, proxy={"server_name": NAMES}))
    assert "--register-unsafely-without-email" in no_mail and "--email" not in no_mail


def write_pair(tmp_path, key_text="-----BEGIN PRIVATE KEY-----\nSECRETKEYBYTES\n-----END PRIVATE KEY-----\n"):
    (tmp_path / "chain.pem").write_text("-----BEGIN CERTIFICATE-----\nCHAIN\n-----END CERTIFICATE-----\n")
    (tmp_path / "key.pem").write_text(key_text)
    return settings(tls={**MANUAL, "cert": str(tmp_path / "chain.pem"), "key": str(tmp_path / "key.pem")},
                    proxy={"server_name": NAMES})


def test_your_key_goes_in_one_0600_root_file_that_is_never_shown(tmp_path):
    s = write_pair(tmp_path)
    steps = {step.name: step.op for step in provisioning.steps(s, "deploy", "ssh-ed25519 AAA op", root_facts())}
    op = steps["certificate /etc/fabdeploy/tls/guestbook/bundle.pem"]
    assert isinstance(op, Install) and op.secret and op.mode == 0o600
    assert op.text == "-----BEGIN CERTIFICATE-----\nCHAIN\n-----END CERTIFICATE-----\n" \
                      "-----BEGIN PRIVATE KEY-----\nSECRETKEYBYTES\n-----END PRIVATE KEY-----\n"
    assert op.validate == certs.PAIR_CHECK and "{}" in op.validate  # the new file's path, not its text
    assert "SECRETKEYBYTES" not in " ".join(op.describe()) and "SECRETKEYBYTES" not in repr(op)
    assert list(steps).index("certificate /etc/fabdeploy/tls/guestbook/bundle.pem") < list(steps).index(
        "site /etc/nginx/sites-enabled/guestbook.conf")


@pytest.mark.parametrize("problem, key", [("missing-key", "tls.key"), ("not-a-key", "tls.key"),
                                          ("key-in-chain", "tls.cert")])
def test_unreadable_or_wrong_files_are_refused_by_key_without_their_contents(tmp_path, problem, key):
    s = write_pair(tmp_path, key_text="SECRETKEYBYTES but no PEM marker\n")
    if problem == "missing-key":
        os.unlink(tmp_path / "key.pem")
    if problem == "key-in-chain":
        (tmp_path / "chain.pem").write_text("-----BEGIN CERTIFICATE-----\nC\n-----END CERTIFICATE-----\n"
                                            "-----BEGIN PRIVATE KEY-----\nSECRETKEYBYTES\n-----END PRIVATE KEY-----\n")
        (tmp_path / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\nK\n-----END PRIVATE KEY-----\n")
    with pytest.raises(DeployError) as err:
        provisioning.steps(s, "deploy", "ssh-ed25519 AAA op", root_facts())
    assert err.value.line().startswith(f"setting 'fabdeploy.{key}'") and "SECRETKEYBYTES" not in err.value.line()


def test_the_record_holds_what_the_site_bakes_in_and_a_change_asks_for_provision():
    s = settings(**merged(ACME, {"proxy": {"extra": {"client_max_body_size": "20m"}}}))
    record = provisioning.registration(s, "deploy", True)
    assert record["tls"] == {"mode": "acme", "port": 443, "hsts": False, "email": "ops@guestbook.example",
                             "directory": "https://acme-v02.api.letsencrypt.org/directory"}
    assert record["static"] == ["/static"] and record["extra"]["client_max_body_size"] == "20m"
    assert record["access_log"] == "/var/log/nginx/guestbook.access.log"
    assert json.loads(json.dumps(record)) == record  # what the host keeps compares equal to it
    registered = {"registration": {"values": record, "path": "/etc/fabdeploy/apps/guestbook.json"}}
    ph.check_server(target(s, **registered))  # the same settings: no complaint
    bigger = settings(**merged(ACME, {"proxy": {"extra": {"client_max_body_size": "50m"}}}))
    with pytest.raises(DeployError, match=r"changed \(extra\)"):
        ph.check_server(target(bigger, **registered))
    with pytest.raises(DeployError, match=r"changed \(extra, tls\)"):
        ph.check_server(target(settings(proxy={"server_name": NAMES, "extra": {"client_max_body_size": "50m"}}),
                               **registered))


# -- the helper's new verbs check their arguments ----------------------------------------------

REG = {"app": "guestbook", "proxy": "nginx", "access_log": "/var/log/nginx/guestbook.access.log"}


@pytest.mark.parametrize("args", [["0"], ["x"], ["-5"], ["100001"], ["10", "--follow"], ["10", "follow", "; id"]])
def test_the_access_log_verb_takes_a_count_and_follow_only(args):
    with pytest.raises(helper.Refused):
        helper.access_log(REG, args)


def test_the_renewed_verb_is_roots_alone(monkeypatch):
    monkeypatch.setenv("SUDO_UID", "1000")
    with pytest.raises(helper.Refused, match="certbot's"):
        helper.renewed(REG, [])
