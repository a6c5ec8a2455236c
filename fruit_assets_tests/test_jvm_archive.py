"""The tests' JVM class archive (`jvm_archive`) must never make a JVM print anything: a JVM that starts
before the archive exists, or with another class path (the java launcher Spark runs first, or an
emulated runtime's pyspark), runs without it, silently."""

import os
import subprocess
from pathlib import Path

from fruit_assets_tests import jvm_archive

# Plain JVMs: without the tests' JDK_JAVA_OPTIONS (the launcher would print a "Picked up" note for it).
JAVA_ENV = {name: value for name, value in os.environ.items() if name != "JDK_JAVA_OPTIONS"}


def _java_output(options: str, *args: str) -> str:
    done = subprocess.run(["java", *options.split(), *(args or ["-version"])], env=JAVA_ENV, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr  # the JVM's own log (-Xlog) goes to stdout


def test_a_missing_archive_is_silent(tmp_path):
    assert _java_output(jvm_archive.java_options(tmp_path / "absent.jsa")).startswith("openjdk version")
    assert _java_output(jvm_archive.java_options(tmp_path / "absent.jsa"), "-cp", str(_hello_jar(tmp_path)), "Hello") == ""


def _hello_jar(folder: Path) -> Path:
    (folder / "Hello.java").write_text("public class Hello { public static void main(String[] a) {} }")
    subprocess.run(["javac", "-d", str(folder), str(folder / "Hello.java")], check=True, timeout=120)
    subprocess.run(["jar", "cf", str(folder / "hello.jar"), "-C", str(folder), "Hello.class"], check=True, timeout=120)
    return folder / "hello.jar"


def test_an_archive_of_another_class_path_is_silent_where_the_bare_option_warns(tmp_path):
    # An archive dumped with one class path, used by a JVM with another one (Spark's jars, and the java
    # launcher Spark runs first or an emulated runtime's pyspark): the JVM must not use it.
    archive, jar = tmp_path / "other.jsa", _hello_jar(tmp_path)
    extra = tmp_path / "extra.jar"
    extra.write_bytes(jar.read_bytes())
    subprocess.run(["java", f"-XX:ArchiveClassesAtExit={archive}", "-cp", f"{jar}:{extra}", "Hello"], env=JAVA_ENV,
                   check=True, capture_output=True, timeout=120)
    assert archive.exists()
    assert "warning" in _java_output(f"-XX:SharedArchiveFile={archive}", "-cp", str(extra), "Hello")  # what the options silence
    assert _java_output(jvm_archive.java_options(archive), "-cp", str(extra), "Hello") == ""
