"""VIP hook scripts rendered from templates/: valid shell, the right hastctl calls, a valid
keepalived configuration (checked by keepalived itself where it is installed)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from hastpy import hookscripts

SETTINGS = hookscripts.HookSettings(
    hastctl="/opt/hastpy/bin/hastctl",
    config="/etc/hast.conf",
    resources=(hookscripts.HookResource("data", "/srv/data", "ext4"), hookscripts.HookResource("raw")),
    vip="10.99.0.100",
    vip_prefix=24,
    interface="eth0",
    node="node-a",
    advert_int=0.1,
)


@pytest.mark.parametrize("kind", sorted(hookscripts.KINDS))
def test_scripts_are_valid_shell(kind, tmp_path):
    for name, text in hookscripts.render(kind, SETTINGS).items():
        if name.endswith(".sh"):
            path = tmp_path / name
            path.write_text(text)
            subprocess.run(["sh", "-n", str(path)], check=True)
            assert text.startswith("#!/bin/sh\n# " + hookscripts.HEADER)


def test_ucarp_up_returns_at_once_and_promotes_each_resource():
    up = hookscripts.render("ucarp", SETTINGS)["vip-up.sh"]
    assert "setsid /opt/hastpy/bin/hastctl promote -c /etc/hast.conf -n node-a --mount /srv/data --fstype ext4 data" in up
    assert "setsid /opt/hastpy/bin/hastctl promote -c /etc/hast.conf -n node-a raw" in up
    assert up.count(" &\n") >= 2  # every promotion in the background
    assert 'ip addr add "$vip/24" dev "$iface"' in up


def test_ucarp_down_demotes_synchronously_and_drops_the_vip():
    down = hookscripts.render("ucarp", SETTINGS)["vip-down.sh"]
    assert "/opt/hastpy/bin/hastctl demote -c /etc/hast.conf -n node-a --mount /srv/data --force data" in down
    assert "setsid" not in down
    assert 'ip addr del "$vip/24" dev "$iface"' in down


def test_keepalived_conf_uses_vrrp3_for_subsecond_adverts(tmp_path):
    conf = hookscripts.render("keepalived", SETTINGS)["keepalived.conf"]
    assert "advert_int 0.1" in conf and "version 3" in conf and "nopreempt" in conf
    slow = hookscripts.render("keepalived", hookscripts.HookSettings(**{**SETTINGS.__dict__, "advert_int": 1}))
    assert "version 3" not in slow["keepalived.conf"]


@pytest.mark.skipif(shutil.which("keepalived") is None, reason="keepalived not installed")
def test_keepalived_accepts_the_configuration(tmp_path):
    files = hookscripts.render("keepalived", hookscripts.HookSettings(**{**SETTINGS.__dict__, "notify_script": str(tmp_path / "notify.sh")}))
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "notify.sh").chmod(0o755)
    cp = subprocess.run(["keepalived", "-t", "-f", str(tmp_path / "keepalived.conf")], capture_output=True, text=True)
    assert cp.returncode == 0, cp.stderr


def test_unknown_kind():
    with pytest.raises(ValueError):
        hookscripts.render("carp", SETTINGS)
