"""The maintenance daemon: takes back what dead nodes held and keeps Redis bounded."""
