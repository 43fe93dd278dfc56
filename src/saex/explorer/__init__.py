"""The feature index (SQLite + thumbnails) and the explorer web app that reads it."""
