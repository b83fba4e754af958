"""Optional sign-in with Streamlit's OIDC support (``st.login``), on when ``.streamlit/secrets.toml`` has an
``[auth]`` section (see the README). Without it the app is open to whoever reaches it: put it behind a reverse proxy
that authenticates, or on a network only the intended users reach."""

from __future__ import annotations

import streamlit as st


def auth_configured() -> bool:
    try:
        return "auth" in st.secrets
    except Exception:  # no secrets.toml at all: Streamlit raises on access, which means "not configured"
        return False


def require_login() -> str | None:
    """With ``[auth]`` configured, show only a sign-in button until the user has signed in; returns the signed-in
    user's e-mail (for the audit log), or None when sign-in is not configured."""
    if not auth_configured():
        return None
    if not st.user.is_logged_in:
        st.markdown("This medseg server requires you to sign in.")
        st.button("Sign in", on_click=st.login, type="primary", icon=":material/login:")
        st.stop()
    email = str(st.user.get("email") or st.user.get("name") or "signed-in user")
    with st.sidebar:
        st.caption(f"Signed in as {email}")
        st.button("Sign out", on_click=st.logout, key="sign_out")
    return email
