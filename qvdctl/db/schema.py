"""Tables of the node's database (SQLAlchemy Core, so PostgreSQL can come later).

Names follow QVD where it has them (osfs, dis, di_tags, users, vms, hosts).
Ids are never reused (AUTOINCREMENT): they name containers and folders on
disk (``<vm id>-<user id>-homefs``), so a new VM must never inherit a deleted
one's id, and with it that VM's home.

A VM's runtime state (state, host, current DI, timestamps) sits in its own row,
and so does the command an admin queued for it in a fleet (``vm_cmd``, SPEC §6):
one row keeps the queries simple, and a command is claimed with one conditional
UPDATE of it. A host's row carries its HKD's lease (``state``, ``ok_ts``).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from qvdctl.db.states import VmState

metadata = MetaData()

# The channel a statement-level trigger on vms notifies on PostgreSQL at every change
# of a VM's row (created by migrations._add_web_admin; the web admin's live feed).
VMS_CHANGED = "qvd_vms_changed"

schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, nullable=False),
)

settings = Table(
    "settings",
    metadata,
    Column("key", String(200), primary_key=True),
    Column("value", Text, nullable=False),
)

osfs = Table(
    "osfs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("memory", Integer, nullable=False),  # MiB, the container's limit
    Column("user_storage", Integer, nullable=False),  # MiB, 0 = unlimited
    # The admin's lxc.signal.halt for every image of the flavour; a DI's own wins over
    # it, and it over what the image's /sbin/init wants (images/halt.py). Added by
    # migrations._add_osf_halt_signal.
    Column("halt_signal", String(20), nullable=True),
    sqlite_autoincrement=True,
)

dis = Table(
    "dis",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("osf_id", Integer, ForeignKey("osfs.id"), nullable=False),
    # File name inside images/, unique because it is also the name on disk.
    Column("path", String(255), nullable=False, unique=True),
    Column("version", String(200), nullable=False),
    Column("sha256", String(64), nullable=False),
    # Bytes: BIGINT, since a desktop image passes 2 GiB (migrations._widen_di_size).
    Column("size", BigInteger, nullable=False),
    Column("created", DateTime, nullable=False),
    # The admin's lxc.signal.halt for this image; NULL: what its /sbin/init wants
    # (images/halt.py). Added by migrations._add_di_halt_signal.
    Column("halt_signal", String(20), nullable=True),
    UniqueConstraint("osf_id", "version"),
    sqlite_autoincrement=True,
)

di_tags = Table(
    "di_tags",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("di_id", Integer, ForeignKey("dis.id", ondelete="CASCADE"), nullable=False),
    # Denormalised so a tag can be unique within an OSF (moving 'head' moves it).
    Column("osf_id", Integer, ForeignKey("osfs.id"), nullable=False),
    Column("tag", String(200), nullable=False),
    UniqueConstraint("osf_id", "tag"),
    sqlite_autoincrement=True,
)

users = Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("login", String(200), nullable=False, unique=True),
    Column("password", String(300), nullable=False),  # scrypt, see commands/user.py
    Column("blocked", Integer, nullable=False, default=0),
    sqlite_autoincrement=True,
)

hosts = Table(
    "hosts",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(253), nullable=False, unique=True),
    Column("address", String(64), nullable=False),
    Column("created", DateTime, nullable=False),
    # Fleet (qvdctl/fleet/): the HKD's state (stopped starting running lost), the time
    # of its last lease renewal (seconds since the epoch), and whether new VMs keep off.
    Column("state", String(20), nullable=False, server_default="stopped"),
    Column("ok_ts", Float, nullable=True),
    Column("blocked", Integer, nullable=False, server_default="0"),
    sqlite_autoincrement=True,
)

vms = Table(
    "vms",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("user_id", Integer, ForeignKey("users.id"), nullable=False),
    Column("osf_id", Integer, ForeignKey("osfs.id"), nullable=False),
    Column("di_tag", String(200), nullable=False),
    Column("ip", String(15), nullable=False, unique=True),
    Column("blocked", Integer, nullable=False, default=0),
    # Runtime state.
    Column("state", String(20), nullable=False, default=VmState.STOPPED.value),
    Column("user_state", String(20), nullable=False, default="disconnected"),
    Column("host_id", Integer, ForeignKey("hosts.id"), nullable=True),
    Column("current_di_id", Integer, ForeignKey("dis.id"), nullable=True),
    Column("created", DateTime, nullable=False),
    Column("state_changed", DateTime, nullable=False),
    # Fleet: the command queued for the VM's host (start, stop; busy once claimed),
    # when it was queued (seconds since the epoch), and the last failure's one line.
    Column("vm_cmd", String(10), nullable=True),
    Column("cmd_at", Float, nullable=True),
    Column("error", Text, nullable=True),
    sqlite_autoincrement=True,
)

# --- the web admin (qvdctl/web/) and the audit log ------------------------------------
# Added together by migrations._add_web_admin.

admins = Table(
    "admins",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("login", String(200), nullable=False, unique=True),
    Column("password", String(300), nullable=False),  # argon2id, see qvdctl/web/accounts.py
    Column("role", String(10), nullable=False),  # admin | viewer
    # Lock-out: failed logins in a row, and until when (seconds since the epoch) the
    # account refuses even the right password.
    Column("failures", Integer, nullable=False, server_default="0"),
    Column("locked_until", Float, nullable=True),
    sqlite_autoincrement=True,
)

web_sessions = Table(
    "web_sessions",
    metadata,
    # The SHA-256 of the cookie's random token: whoever reads the database cannot log in.
    Column("token_hash", String(64), primary_key=True),
    Column("admin_id", Integer, ForeignKey("admins.id", ondelete="CASCADE"), nullable=False),
    Column("csrf", String(64), nullable=False),
    Column("last_seen", Float, nullable=False),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("at", DateTime, nullable=False),
    Column("who", String(200), nullable=False),  # a web admin's login, or the CLI's user
    Column("origin", String(300), nullable=False),  # web: the client address; CLI: cli@host
    Column("action", String(100), nullable=False),  # "vm start", "host block", ...
    Column("object", Text, nullable=False),  # what it acted on: the filter, or the names
    Column("args", Text, nullable=False),  # key=value words, secrets replaced by ***
    Column("result", Text, nullable=False),  # "ok" or the error line
    sqlite_autoincrement=True,
)

# What each running VM uses, as its node's HKD last read it (qvdctl/vm/usage.py), so
# that the web admin on any machine of a fleet shows it. Added by
# migrations._add_vm_usage.
vm_usage = Table(
    "vm_usage",
    metadata,
    Column("vm_id", Integer, ForeignKey("vms.id", ondelete="CASCADE"), primary_key=True),
    Column("host_id", Integer, ForeignKey("hosts.id", ondelete="CASCADE"), nullable=False),
    Column("at", Float, nullable=False),  # when it was read, seconds since the epoch
    Column("cpu_seconds", Float, nullable=True),  # NULL: its cgroup could not be read
    Column("memory_bytes", Float, nullable=True),
    Column("qvdfs", Text, nullable=True),  # the daemon's counters as JSON; NULL: none
)
