"""Disk images: importing tarballs into images/ and extracting them into basefs/."""
