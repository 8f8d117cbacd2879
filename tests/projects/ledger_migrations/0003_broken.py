"""Release 3: a migration that fails, as a real one might halfway through a deploy."""
revision = "0003"
down_revision = "0002"


def upgrade():
    raise RuntimeError("ledger's migration 0003 fails on purpose")


def downgrade():
    pass
