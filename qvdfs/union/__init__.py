"""The union itself: branches, the merged index, markers, copy-up. No pyfuse3 here."""
