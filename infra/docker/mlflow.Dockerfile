# MLflow tracking server image for infra/k8s/mlflow.yaml: PostgreSQL driver and boto3 for S3.
#
#   docker build -f infra/docker/mlflow.Dockerfile -t ghcr.io/your-org/lightrnn-mlflow:3.17.2 infra/docker
FROM python:3.11-slim

# the MLflow version the jobs are tested with (constraints-cpu.txt); a server older than its clients may refuse calls
ARG MLFLOW_VERSION=3.17.2
RUN pip install --no-cache-dir "mlflow==${MLFLOW_VERSION}" psycopg2-binary boto3

RUN useradd --create-home mlflow
USER mlflow
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
