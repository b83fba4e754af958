"""medseg clinician web app (Streamlit). Entry script: app/streamlit_app.py; start with `medseg app`."""
