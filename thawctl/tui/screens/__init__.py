"""The dashboard's screens: main (everything), help (keys), confirm (before removing)."""
