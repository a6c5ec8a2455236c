"""The file a Databricks Pipes task runs (`spark_python_task.python_file`), uploaded to the volume beside
the package's zip: it puts that zip first on the path and hands over to `remote.main`.

Standalone on purpose: it runs before `fruit_assets` can be imported."""

import sys

PACKAGE_ARGUMENT = "--fruit-package"

if __name__ == "__main__":
    package = sys.argv[sys.argv.index(PACKAGE_ARGUMENT) + 1]
    sys.path.insert(0, package)
    from fruit_assets.databricks.pipes.remote import main

    main(package)
