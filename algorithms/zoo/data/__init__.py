"""Bundled text (gzipped UTF-8); a package only so that wheels carry the files."""
