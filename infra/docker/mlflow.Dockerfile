# MLflow tracking server image for infra/k8s/mlflow.yaml: PostgreSQL driver and boto3 for S3.
#
#   docker build -f infra/docker/mlflow.Dockerfile -t "$REGISTRY/lightrnn-mlflow:3.17.2" .
#
# Build from the repository root: mlflow.Dockerfile.dockerignore lets only constraints-cpu.txt
# into the context. MLflow is the version the jobs are tested with (pinned there); a server
# older than its clients may refuse their calls.
FROM python:3.11-slim

COPY constraints-cpu.txt /tmp/constraints-cpu.txt
RUN pip install --no-cache-dir -c /tmp/constraints-cpu.txt mlflow psycopg2-binary boto3 \
    && python -c "import mlflow; print('mlflow', mlflow.__version__)"

RUN useradd --create-home mlflow
USER mlflow
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
