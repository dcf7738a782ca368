"""`thawctl top`: the Textual dashboard of thawd.

app.py is the App; screens/ holds the main, help and confirmation screens; widgets/ the
pieces of the main screen; thawtop.tcss all of the styling. The only data the dashboard
shows are thaw.client's immutable records, which one worker reads from the daemon's watch
stream (source.py) and posts as messages (messages.py).
"""
