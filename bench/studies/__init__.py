"""The studies that regenerate docs/*.md: each resumable, each scoring its models with bench/common.py."""
