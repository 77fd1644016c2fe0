"""The run directory and its artifacts: atomic files and hashes, the manifest, readers
and writers, and run directories behind a URI."""
