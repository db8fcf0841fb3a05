//! knn tests
