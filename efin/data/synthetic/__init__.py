"""The built-in synthetic speech corpus (``data=synthetic``): sentences (``sentences``) spoken by
eSpeak NG voices (``speech``), generated offline and deterministically (``corpus``)."""
