"""Render the VIP hook scripts (ucarp up/down, keepalived notify and config) from templates/.

The same Jinja2 templates serve the Ansible roles and `hastctl render-hooks`, for people who do
not use Ansible. Pure apart from reading the templates: values in, {file name: text} out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import jinja2

TEMPLATE_DIR = Path(__file__).parent / "templates"
HEADER = "Rendered by hastctl render-hooks; changes are lost when it is run again."
KINDS = {
    "ucarp": {"vip-up.sh": "ucarp-up.sh.j2", "vip-down.sh": "ucarp-down.sh.j2"},
    "keepalived": {"notify.sh": "keepalived-notify.sh.j2", "keepalived.conf": "keepalived.conf.j2"},
}


@dataclass(frozen=True)
class HookResource:
    name: str
    mount: str | None = None
    fstype: str = "ext4"


@dataclass(frozen=True)
class HookSettings:
    hastctl: str
    config: str
    resources: tuple[HookResource, ...]
    vip: str
    vip_prefix: int
    interface: str
    logfile: str = "/var/log/hast-failover.log"
    node: str | None = None  # passed as `-n` where the node name is not the hostname (labs)
    force: bool = True  # demote kills the users of a busy mount: the node is losing the VIP
    notify_script: str = "/etc/keepalived/hast-notify.sh"
    priority: int = 100
    advert_int: float = 1
    vrid: int = 51
    extra: dict = field(default_factory=dict)


def render(kind: str, settings: HookSettings) -> dict[str, str]:
    if kind not in KINDS:
        raise ValueError(f"unknown hook kind {kind!r} (choose from {', '.join(KINDS)})")
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,  # shell scripts and keepalived.conf, not HTML
    )
    values = asdict(settings)
    values["header"] = HEADER
    values.update(values.pop("extra"))
    return {out: env.get_template(tpl).render(**values) for out, tpl in KINDS[kind].items()}
