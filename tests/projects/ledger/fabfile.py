from fabdeploy import ns  # noqa: F401  (gives fab deploy, rollback, releases, unlock)
