"""The widgets of the main screen; each renders records it is given and fetches nothing."""
